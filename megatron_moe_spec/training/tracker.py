"""The auxiliary losses, read from megatron-core's MoE tracker and reduced as Megatron-LM does.

Each MoE layer records its losses per micro-batch in megatron's layer-wise tracker (read and reduced
through ``core.moe_tracker``, the one path to it on every megatron-core version): megatron's own
(``load_balancing_loss``, ``z_loss``, ...) and ours (``specialization_loss``, ``coupling_loss``,
``orthogonality_loss``, ``variance_loss``, see ``core.aux_losses``). megatron's reduction sums over
pipeline stages and over the recorded reduce group (tensor x context parallel: each rank holds its
partial), then averages over data parallel. It is a collective per name, so every rank registers
every name up front (a stage without MoE layers would otherwise skip the collective and hang the
others).

megatron-core 0.16.1 records ``z_loss`` without any group, as the mean over each rank's local tokens
(its gradient coefficient is divided by the tp_cp size, the logged value is not): we average it over
tensor x context x data parallel, so every rank logs the same value, the mean over the micro-batch.
megatron-core 0.19 does the same itself (``avg_group`` = TPxDPxCP, PR #3199); setting it again there
changes nothing.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

_LB_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
             "global_aux_loss": "global_load_balancing_loss"}


def tracked_loss_names(cfg) -> List[str]:
    """Every auxiliary loss this run records, megatron's first."""
    from megatron_moe_spec.core.layer_specs import enabled_loss_names

    m = cfg.model
    if not m.is_moe:
        return []
    types = m.moe_router_load_balancing_type
    coeffs = m.moe_aux_loss_coeff
    types = types if isinstance(types, list) else [types]
    coeffs = coeffs if isinstance(coeffs, list) else [coeffs] * len(types)
    names = [_LB_NAMES[t] for t, c in zip(types, coeffs) if t in _LB_NAMES and c > 0]
    if m.moe_z_loss_coeff:
        names.append("z_loss")
    return names + enabled_loss_names(cfg.specialization)


def register(cfg, num_layers: int) -> List[str]:
    """Create every tracked name on this rank with the group megatron reduces it over."""
    from megatron.core import parallel_state

    from megatron_moe_spec.core import moe_tracker

    tp_cp = parallel_state.get_tensor_and_context_parallel_group()
    names = tracked_loss_names(cfg)
    for name in names:
        moe_tracker.ensure(name, num_layers)
        if name == "z_loss":
            _fix_z_loss_groups(name)
        elif name == "global_load_balancing_loss":
            moe_tracker.set_groups(name, reduce_group=parallel_state.get_tensor_and_data_parallel_group(
                with_context_parallel=True), dp_average=False)
        else:
            moe_tracker.set_groups(name, reduce_group=tp_cp)
    return names


def coupling_layers(config, cp_pipeline: str, hybrid_layer_pattern: Optional[str] = None) -> List[int]:
    """The 0-based layers that carry an R_cp value: ``layer_specs.coupled_layers`` (with
    ``cp_pipeline: skip`` the pairs split across pipeline stages / model chunks are left out).

    A HybridModel (``hybrid_layer_pattern``): the E layers of the pattern, each paired with the next E
    whatever lies between; the pattern's ``|`` segments place them on the stages (one rule for the
    GPT and the hybrid layers: ``layer_specs.cross_stage_pairs``)."""
    from megatron_moe_spec.core.layer_specs import coupled_layers

    return coupled_layers(config, cp_pipeline, hybrid_layer_pattern=hybrid_layer_pattern)


def read(names: List[str], num_microbatches: int, moe_layer_indices: List[int],
         coupling: List[int] = None) -> Dict[str, float]:
    """Reduce (a collective: every rank) and return ``{name: mean over layers, name/layer_i: value}``.

    Values are per micro-batch (the tracker sums micro-batches). ``coupling_loss`` is indexed by the
    first layer of each adjacent MoE pair (``coupling``, default: every MoE layer but the last).
    """
    from megatron_moe_spec.core import moe_tracker

    if "z_loss" in names:
        _fix_z_loss_groups("z_loss")  # each of megatron's records resets them
    moe_tracker.sync(names)
    out: Dict[str, float] = {}
    for name in names:
        values = (moe_tracker.values(name).double() / num_microbatches).cpu().tolist()
        layers = moe_layer_indices
        if name == "coupling_loss":
            layers = moe_layer_indices[:-1] if coupling is None else coupling
        if not layers:  # e.g. R_cp when every adjacent MoE pair is split across pipeline stages
            continue
        per_layer = [values[i] for i in layers]
        out[name] = sum(per_layer) / len(per_layer)
        for i, v in zip(layers, per_layer):
            out[f"{name}/layer_{i}"] = v
    return out


def _fix_z_loss_groups(name: str) -> None:
    from megatron.core import parallel_state

    from megatron_moe_spec.core import moe_tracker

    moe_tracker.set_groups(name, reduce_group=None, dp_average=False,
                           avg_group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True))


def clear() -> None:
    from megatron_moe_spec.core import moe_tracker

    moe_tracker.clear()
