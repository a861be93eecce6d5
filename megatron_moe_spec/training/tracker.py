"""The auxiliary losses, read from megatron-core's MoE tracker and reduced as Megatron-LM does.

Each MoE layer records its losses per micro-batch in megatron's layer-wise tracker
(``save_to_aux_losses_tracker``): megatron's own (``load_balancing_loss``, ``z_loss``, ...) and ours
(``specialization_loss``, ``coupling_loss``, ``orthogonality_loss``, ``variance_loss``, see
``core.aux_losses``). ``reduce_aux_losses_tracker_across_ranks`` sums over pipeline stages and over
the recorded reduce group (tensor x context parallel: each rank holds its partial), then averages
over data parallel. It is a collective per name, so every rank registers every name up front (a
stage without MoE layers would otherwise skip the collective and hang the others).

megatron-core 0.16.1 records ``z_loss`` without any group, as the mean over each rank's local tokens
(its gradient coefficient is divided by the tp_cp size, the logged value is not): we average it over
tensor x context x data parallel, so every rank logs the same value, the mean over the micro-batch.
"""
from __future__ import annotations

from typing import Dict, List

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
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    device = torch.cuda.current_device() if torch.cuda.is_available() else torch.device("cpu")
    tp_cp = parallel_state.get_tensor_and_context_parallel_group()
    names = tracked_loss_names(cfg)
    for name in names:
        entry = tracker.setdefault(name, {"values": torch.zeros(num_layers, device=device)})
        if name == "z_loss":
            _fix_z_loss_groups(entry)
        elif name == "global_load_balancing_loss":
            entry.update(reduce_group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True),
                         avg_group=None, reduce_group_has_dp=True)
        else:
            entry.update(reduce_group=tp_cp, avg_group=None, reduce_group_has_dp=False)
    return names


def coupling_layers(config, moe_layer_indices: List[int]) -> List[int]:
    """The 0-based layers that carry an R_cp value: the first layer of each adjacent MoE pair, except
    pairs split across pipeline stages / model chunks, which the adapter leaves out (it warns)."""
    from megatron_moe_spec.core.layer_specs import cross_stage_pairs

    numbers = [i + 1 for i in moe_layer_indices]
    split = {a for a, _ in cross_stage_pairs(config, numbers)}
    return [n - 1 for n in numbers[:-1] if n not in split]


def read(names: List[str], num_microbatches: int, moe_layer_indices: List[int],
         coupling: List[int] = None) -> Dict[str, float]:
    """Reduce (a collective: every rank) and return ``{name: mean over layers, name/layer_i: value}``.

    Values are per micro-batch (the tracker sums micro-batches). ``coupling_loss`` is indexed by the
    first layer of each adjacent MoE pair (``coupling``, default: every MoE layer but the last).
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import (
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    if "z_loss" in tracker:
        _fix_z_loss_groups(tracker["z_loss"])  # each save resets them
    reduce_aux_losses_tracker_across_ranks(names)
    out: Dict[str, float] = {}
    for name in names:
        values = (tracker[name]["values"].double() / num_microbatches).cpu().tolist()
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


def _fix_z_loss_groups(entry: dict) -> None:
    from megatron.core import parallel_state

    entry.update(reduce_group=None, reduce_group_has_dp=False,
                 avg_group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True))


def clear() -> None:
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()
