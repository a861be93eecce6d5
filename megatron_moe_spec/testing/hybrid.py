"""Test helpers for HybridModel (core.hybrid), shared by tests/test_hybrid.py (CPU) and
tests/test_gpu_hybrid.py (CUDA): one training step, megatron's migration-guide weight mapping from a
GPT model to its ``*E*E`` equivalent, gradient comparison, and an independent float64 R_cp.

The R_cp reference (:func:`routing`, :func:`spec_coupling`) uses no megatron code: the router's
softmax and top-k are recomputed from a MoE layer's input and its router weight.
"""
from __future__ import annotations

import functools
import re
from typing import Dict, List, Tuple

import torch

from megatron_moe_spec.specialization_config import SpecializationConfig
from megatron_moe_spec.testing.tiny_gpt import global_microbatches

NAMES = ("specialization_loss", "coupling_loss", "orthogonality_loss", "variance_loss")
COEFF_FIELD = {"specialization_loss": "sp_coeff", "coupling_loss": "cp_coeff",
               "orthogonality_loss": "ortho_coeff", "variance_loss": "var_coeff"}  # loss name -> its coefficient
QUIET = dict(moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none")  # only our losses
ALL_ON = SpecializationConfig(sp_coeff=0.3, cp_coeff=0.2, ortho_coeff=0.4, var_coeff=0.1)


def fresh_tracker() -> None:
    """Forget every tracker entry (megatron's load-balancing loss too): its size is the model's num_layers."""
    from megatron_moe_spec.core import moe_tracker

    moe_tracker.forget(list(moe_tracker.recorded_names()) + list(NAMES))


def gpt_to_hybrid_key(key: str) -> str:
    """megatron's migration guide: GPT layer i's attention -> hybrid 2i, its MLP/MoE -> 2i + 1, the
    final norm -> ``final_norm``."""
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
    if match:
        i, rest = int(match.group(1)), match.group(2)
        attention = rest.startswith(("input_layernorm.", "self_attention.", "self_attn_bda"))
        return f"decoder.layers.{2 * i + (0 if attention else 1)}.{rest}"
    return key.replace("decoder.final_layernorm.", "decoder.final_norm.")


def load_mapped(hybrid, gpt) -> None:
    """The GPT model's weights into its ``*E*E`` equivalent (strict: every key maps)."""
    state = {gpt_to_hybrid_key(k): v for k, v in gpt.state_dict().items()}
    missing, unexpected = hybrid.load_state_dict(state, strict=True)
    assert not missing and not unexpected


def run_step(model, settings, lm_weight: float = 1.0, device: str = "cpu"):
    """Forward and backward of lm_weight x the mean token loss (our losses ride along through megatron's
    aux-loss autoscaler). Returns (lm loss, {name: grad}, {loss name: tracker values [num_layers]})."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_moe_spec.core import moe_tracker

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, device=device))
    model.train()
    model.zero_grad(set_to_none=True)
    batch = {k: v.to(device) for k, v in global_microbatches(settings, 1)[0].items()}
    out = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                labels=batch["labels"])
    lm = out.float().mean()
    (lm * lm_weight).backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    tracker = {n: moe_tracker.values(n).detach().clone() for n in NAMES if moe_tracker.values(n) is not None}
    moe_tracker.clear()
    return float(lm.detach()), grads, tracker


def assert_grads_match(gpt_grads, hybrid_grads, rtol: float, what: str, atol_of_scale: float = 1e-7) -> float:
    """Every GPT parameter's gradient equals its mapped hybrid parameter's, to ``rtol`` of that
    parameter's own gradient (+ ``atol_of_scale`` of the largest, round-off); returns the largest."""
    assert sorted(gpt_to_hybrid_key(k) for k in gpt_grads) == sorted(hybrid_grads)
    scale = max(float(g.abs().max()) for g in gpt_grads.values())
    assert scale > 0, f"{what}: no gradient at all"
    problems = []
    for name, g in gpt_grads.items():
        h = hybrid_grads[gpt_to_hybrid_key(name)]
        tol = rtol * float(g.abs().max()) + atol_of_scale * scale
        err = float((g.double() - h.double()).abs().max())
        if err > tol:
            problems.append(f"{name}: max|err| {err:.3e} > {tol:.3e} (max|grad| {float(g.abs().max()):.3e})")
    assert not problems, f"{what}: gradients differ:\n  " + "\n  ".join(problems)
    return scale


# ----------------------------------------------------------------------------- the R_cp reference
def spec_coupling(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], form: str) -> torch.Tensor:
    """docs/spec.md section 2, float64: -mean_t M_t^l M_t^l' with M the top-k mass of the pre-top-k p
    (``form`` "log": -mean_t log(M_t^l M_t^l' + 1e-9)). ``a``, ``b``: :func:`routing` of the two layers."""
    m_a = a["p"].double().gather(1, a["topk_idx"]).sum(1)
    m_b = b["p"].double().gather(1, b["topk_idx"]).sum(1)
    joint = m_a * m_b if form == "product" else torch.log(m_a * m_b + 1e-9)
    return -joint.mean()


def routing(moe, x_SBH: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Pre-top-k p_TE (softmax of x W_r^T, float64) and the top-k experts topk_idx_TK of one MoE layer
    from its input x [S, B, H] and router weight (no megatron code)."""
    x = x_SBH.reshape(-1, x_SBH.shape[-1]).double()
    p = torch.softmax(x @ moe.router.weight.double().t(), dim=-1)
    return {"p": p, "topk_idx": torch.topk(p, moe.config.moe_router_topk, dim=-1).indices}


def reference_coupling(stock, settings, coeff: float, form: str, device: str = "cpu"
                       ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], List]:
    """Run megatron's stock model (no losses) once, capture its MoE layers' inputs (in the graph), and
    return (R_cp of its first two MoE layers in float64, {param name: d(coeff * R_cp)/d param or None},
    the MoE layers). The stock model's own output is not used."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    stock.train()
    moe_layers = [m for m in stock.modules() if isinstance(m, MoELayer)]
    inputs = {}
    hooks = [m.register_forward_pre_hook(functools.partial(
        lambda i, mod, args, kw: inputs.__setitem__(i, args[0] if args else kw["hidden_states"]), i),
        with_kwargs=True) for i, m in enumerate(moe_layers)]
    batch = {k: v.to(device) for k, v in global_microbatches(settings, 1)[0].items()}
    try:
        stock(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
              labels=batch["labels"])
    finally:
        for h in hooks:
            h.remove()
    a, b = (routing(m, inputs[i]) for i, m in enumerate(moe_layers[:2]))
    value = spec_coupling(a, b, form)
    names, params = zip(*stock.named_parameters())
    grads = torch.autograd.grad(coeff * value, list(params), allow_unused=True)
    return value, dict(zip(names, grads)), moe_layers
