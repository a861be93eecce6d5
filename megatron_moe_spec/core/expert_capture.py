"""Capture the input of each expert's ``linear_fc2`` (the gated SwiGLU intermediate) during forward.

megatron-core 0.16 applies the router gate *inside* the expert (``per_token_scale``): the input of
``linear_fc2`` is ``g * z`` where ``z = silu(x W_gate) * (x W_up)`` is the spec's SwiGLU intermediate.
We take ``g * z`` from a forward pre-hook and divide the gate out *with its autograd graph*, so

- the value is z up to one rounding (relative 1e-7 in fp32);
- the gradient of a loss on z reaches the expert weights and the layer input exactly as if z had
  been taken before the gate (d/d(gz) = (1/g) d/dz and the chain through gz restores it);
- it never reaches the router: the two paths to g cancel, z (through gz = g*z) and -gz/g^2 (through
  the division), so d/dg (gz / g) = 0. Dividing by a *detached* g would leave the first path alone and
  put z * dL/dz on the gate: invisible for the scale-invariant R_sp, a real leak for L_o.

Rows come in the experts' own order: expert-major over the local experts, the order in which the
dispatcher handed them over. Works for ``SequentialMLP`` (one ``linear_fc2`` per local expert) and
``TEGroupedMLP`` (one grouped ``linear_fc2``); megatron's legacy ``GroupedMLP`` calls grouped GEMMs
without an fc2 module and is refused with a clear error.
"""
from __future__ import annotations

import contextlib
from typing import List

import torch


def fc2_modules(experts: torch.nn.Module) -> List[torch.nn.Module]:
    """The ``linear_fc2`` modules whose inputs, concatenated in order, are the rows of z (times g)."""
    local = getattr(experts, "local_experts", None)
    if local is not None:  # SequentialMLP
        return [expert.linear_fc2 for expert in local]
    if hasattr(experts, "linear_fc2"):  # TEGroupedMLP
        return [experts.linear_fc2]
    raise NotImplementedError(
        f"{type(experts).__name__} has no linear_fc2 module to capture the SwiGLU intermediate from; "
        "R_sp, L_o and the activation-similarity metric need SequentialMLP (moe_grouped_gemm: false) "
        "or, on GPU with Transformer Engine, TEGroupedMLP (moe_use_legacy_grouped_gemm: false)"
    )


@contextlib.contextmanager
def capture_fc2_inputs(experts: torch.nn.Module):
    """Within the block, ``captured`` (the yielded list) receives every fc2 input tensor, in order."""
    captured: List[torch.Tensor] = []

    def hook(module, args):
        captured.append(args[0])

    handles = [m.register_forward_pre_hook(hook) for m in fc2_modules(experts)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def ungate(rows_gated_RW: torch.Tensor, gates_R: torch.Tensor) -> torch.Tensor:
    """Divide the router gate out of expert rows: [R, W] / g[R] (0-gate rows -> 0).

    ``gates_R`` must be the gates the experts multiplied ``rows_gated_RW`` with, *with* their graph, so
    that the gradient reaching the gate through the rows and through the division cancel (see the
    module docstring)."""
    g = gates_R.float().unsqueeze(-1)
    safe = torch.where(g > 0, g, torch.ones_like(g))
    return torch.where(g > 0, rows_gated_RW.float() / safe, torch.zeros_like(safe))
