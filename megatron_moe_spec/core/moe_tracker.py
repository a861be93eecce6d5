"""The one path to megatron-core's MoE tracker, on every supported megatron-core version.

Every part of this package that reads or writes megatron's per-layer MoE tracker (the specialization
layers, the project driver's ``training/tracker.py``, the Megatron-LM hooks, the test helpers) goes
through these functions, so that one place knows the two tracker APIs:

- megatron-core >= 0.18: ``moe_logging.get_moe_metrics_tracker()``, a ``MoEMetricsTracker`` whose
  ``metrics`` are ``MetricEntry`` objects (``values``, ``reduce_group``, ``avg_group``,
  ``needs_dp_avg``). The legacy functions of ``moe_utils`` still exist there but are deprecated
  (each call warns) and ``get_moe_layer_wise_logging_tracker()`` returns a *copy*, so writing into it
  registers nothing. They are never called on these versions.
- megatron-core < 0.18: the module-level dict of ``moe_utils`` (``save_to_aux_losses_tracker``,
  ``get_moe_layer_wise_logging_tracker``, ``reduce_aux_losses_tracker_across_ranks``,
  ``clear_aux_losses_tracker``), entries ``{"values", "reduce_group", "avg_group",
  "reduce_group_has_dp"}``.

Values are per layer (a ``[num_layers]`` tensor, 0-based index = layer_number - 1), summed over the
micro-batches recorded since the last ``clear()``.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch


def _metrics_tracker():
    """megatron's ``MoEMetricsTracker`` (megatron-core >= 0.18), or None before 0.18."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        return None
    return get_moe_metrics_tracker()


def _legacy_dict() -> dict:
    """The tracker dict itself (megatron-core < 0.18 only: from 0.18 this would be a copy)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return get_moe_layer_wise_logging_tracker()


def default_device():
    return torch.cuda.current_device() if torch.cuda.is_available() else torch.device("cpu")


def record(name: str, value: torch.Tensor, layer_number: int, num_layers: int, reduce_group=None) -> None:
    """Add ``value`` (detached, fp32) to layer ``layer_number`` (1-based) of ``name``; summed over
    ``reduce_group`` and averaged over data parallel when reduced (megatron's load-balancing contract)."""
    value = value.detach().float()
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.record(name, value, layer_number, num_layers, reduce_group=reduce_group)
        return
    from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

    save_to_aux_losses_tracker(name, value, layer_number, num_layers, reduce_group=reduce_group)


def recorded_names() -> List[str]:
    """The names recorded or registered on this rank."""
    tracker = _metrics_tracker()
    return list(tracker.metrics if tracker is not None else _legacy_dict())


def values(name: str) -> Optional[torch.Tensor]:
    """The live ``[num_layers]`` tensor of ``name`` (None if this rank has no such entry)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        entry = tracker.metrics.get(name)
        return None if entry is None else entry.values
    entry = _legacy_dict().get(name)
    return None if entry is None else entry["values"]


def ensure(name: str, num_layers: int, device=None) -> bool:
    """Create ``name`` as zeros on this rank if it does not exist; True if it was created."""
    device = device if device is not None else default_device()
    tracker = _metrics_tracker()
    if tracker is not None:
        if name in tracker.metrics:
            return False
        tracker.ensure_initialized(name, num_layers, device=device)
        return True
    tracker = _legacy_dict()
    if name in tracker:
        return False
    tracker[name] = {"values": torch.zeros(num_layers, device=device), "reduce_group": None,
                     "avg_group": None, "reduce_group_has_dp": False}
    return True


def set_groups(name: str, reduce_group=None, avg_group=None, dp_average: bool = True) -> None:
    """Set how ``name`` is reduced: summed over ``reduce_group``, averaged over ``avg_group``, then
    averaged over data parallel iff ``dp_average``. megatron's own ``record`` resets these on every
    call, so set them again right before a reduction when they must differ from megatron's.

    Before 0.18 megatron averages over data parallel only after a ``reduce_group`` sum; with
    ``reduce_group=None`` ``dp_average`` has no effect there (use ``avg_group``)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        entry = tracker.metrics[name]
        entry.reduce_group, entry.avg_group, entry.needs_dp_avg = reduce_group, avg_group, dp_average
        return
    _legacy_dict()[name].update(reduce_group=reduce_group, avg_group=avg_group,
                                reduce_group_has_dp=not dp_average)


def sync(names: List[str]) -> None:
    """megatron's cross-rank reduction of ``names`` (a collective per name; every name must exist on
    every rank of the pipeline group: use ``reduce_union``)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        # What the deprecated reduce_aux_losses_tracker_across_ranks calls (its documented alternative).
        tracker._sync_metrics(list(names))
        return
    from megatron.core.transformer.moe.moe_utils import reduce_aux_losses_tracker_across_ranks

    reduce_aux_losses_tracker_across_ranks(list(names))


def forget(names) -> None:
    """Drop the entries of ``names`` (a fresh start, e.g. between tests; megatron has no such call)."""
    tracker = _metrics_tracker()
    entries = tracker.metrics if tracker is not None else _legacy_dict()
    for name in names:
        entries.pop(name, None)


def clear() -> None:
    """Zero every entry (entries and their groups are kept)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.clear()
        return
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()


def reduce_union(names=None, num_layers: int = None) -> Dict[str, torch.Tensor]:
    """megatron's reduction made safe for any pipeline layout. A collective: every rank calls it.

    megatron reduces the tracker name by name over the pipeline group; a stage that never recorded a
    name (a stage without MoE layers lacks even ``load_balancing_loss``) would skip that collective
    and hang the others. This first agrees on the union of the names across all ranks (one
    ``all_gather_object``), creates the missing ones as zeros, then calls megatron's reduction.
    Returns ``{name: reduced [num_layers] tensor}`` (the live tensors).
    """
    local = sorted(names if names is not None else recorded_names())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, local)
        union = sorted(set().union(*everyone))
    else:
        union = local
    if num_layers is None:
        num_layers = max((len(values(n)) for n in recorded_names()), default=0)
    for name in union:
        ensure(name, num_layers)
    sync(union)
    return {name: values(name) for name in union}

