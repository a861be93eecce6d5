"""Capture what the losses need from megatron's experts, through hooks only.

The MoE layer calls megatron's own ``routed_experts_compute`` (``super()``) inside
:func:`capture_expert_rows`; hooks on the experts module record, for that one call:

- ``fc2_inputs``: the input of each expert's ``linear_fc2`` (forward pre-hooks), concatenated in
  order: the gated SwiGLU intermediate ``g * z`` (megatron-core applies the router gate *inside*
  the expert, ``per_token_scale``), rows expert-major over the local experts, the order in which
  the dispatcher handed them over;
- ``permuted_probs``: the gates of those rows (the experts' third positional argument);
- ``expert_output``: the experts' output ``g * y`` (a forward hook).

Nothing of megatron's method body is copied, so whatever megatron adds there (dgrad-completion
events, zero-copy buffers, new arguments) keeps working. :func:`ungate` then divides the gate out.

Works for ``SequentialMLP`` (one ``linear_fc2`` per local expert) and ``TEGroupedMLP`` (one grouped
``linear_fc2``); megatron's legacy ``GroupedMLP`` calls grouped GEMMs without an fc2 module and is
refused with a clear error.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Optional

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


@dataclass
class ExpertCapture:
    """What one call of the experts module produced (see the module docstring)."""

    fc2_inputs: List[torch.Tensor] = field(default_factory=list)  # [R_e, F / etp] per fc2 call
    permuted_probs: Optional[torch.Tensor] = None  # [R], the gates of the rows
    expert_output: Optional[torch.Tensor] = None  # [R, H], g * y (partial over ETP)

    def gated_z(self) -> torch.Tensor:
        """[R, F / etp]: the fc2 inputs of all local experts, in row order."""
        return self.fc2_inputs[0] if len(self.fc2_inputs) == 1 else torch.cat(self.fc2_inputs, dim=0)


@contextlib.contextmanager
def capture_expert_rows(experts: torch.nn.Module, fc2_inputs: bool):
    """Within the block, the yielded :class:`ExpertCapture` receives the experts' rows.

    ``fc2_inputs``: also hook every ``linear_fc2`` (only when z is needed: R_sp or the metrics).
    """
    capture = ExpertCapture()

    def fc2_hook(module, args):
        if not args:
            raise RuntimeError(
                f"{type(module).__name__}'s forward pre-hook got no input (megatron-core's Transformer "
                "Engine op-fuser path): R_sp, L_o and the similarity metric cannot capture z there; set "
                "use_transformer_engine_op_fuser to false")
        capture.fc2_inputs.append(args[0])

    def experts_hook(module, args, output):
        if capture.permuted_probs is not None:
            raise RuntimeError("the experts module ran twice inside one routed_experts_compute")
        capture.permuted_probs = args[2]
        capture.expert_output = output[0] if isinstance(output, tuple) else output

    handles = [experts.register_forward_hook(experts_hook)]
    if fc2_inputs:
        handles += [m.register_forward_pre_hook(fc2_hook) for m in fc2_modules(experts)]
    try:
        yield capture
    finally:
        for h in handles:
            h.remove()


class _Ungate(torch.autograd.Function):
    """rows / g in fp32, returned in the rows' own dtype; saves only the inputs (no fp32 copy)."""

    @staticmethod
    def forward(ctx, rows_RW: torch.Tensor, gates_R: torch.Tensor):
        g_R1 = gates_R.detach().float().unsqueeze(-1)
        positive_R1 = g_R1 > 0
        inv_R1 = torch.where(positive_R1, 1.0 / torch.where(positive_R1, g_R1, torch.ones_like(g_R1)),
                             torch.zeros_like(g_R1))
        ctx.save_for_backward(rows_RW, inv_R1)
        return (rows_RW.float() * inv_R1).to(rows_RW.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_RW):
        rows_RW, inv_R1 = ctx.saved_tensors
        grad_f = grad_RW.float()
        grad_rows = (grad_f * inv_R1).to(rows_RW.dtype)
        # d(r/g)/dg = -r/g^2: cancels the gradient that reaches g through r = g*z inside the expert.
        grad_gates = -(grad_f * rows_RW.float()).sum(-1) * inv_R1.squeeze(-1).square()
        return grad_rows, grad_gates


def ungate(rows_gated_RW: torch.Tensor, gates_R: torch.Tensor) -> torch.Tensor:
    """Divide the router gate out of expert rows: [R, W] / g[R] -> [R, W] (0-gate rows -> 0).

    ``gates_R`` must be the gates the experts multiplied ``rows_gated_RW`` with, *with* their
    graph. The gradient that reaches g through the division, -<dL/dz, g z> / g^2, cancels the one
    that reaches it through ``g * z`` inside the expert, <dL/dz / g, z>: d/dg (gz / g) = 0, so the
    losses on z and y never reach the router. (Dividing by a *detached* g would leave the second
    path alone: invisible for the scale-invariant R_sp, a real leak for L_o.)

    The division runs in fp32; the result has the rows' dtype (bf16 rows stay bf16, so the EP
    exchange moves activation-dtype bytes), and nothing but the inputs is saved for backward.
    """
    return _Ungate.apply(rows_gated_RW, gates_R)
