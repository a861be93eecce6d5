"""Attaching the specialization losses to the backward pass, and logging them, as megatron does.

Reduction contract (the same as megatron's load-balancing loss):

- Each rank computes a **partial** of a loss over its local tokens, divided by the number of valid
  tokens of the whole micro-batch across the TPxCP group (``global_valid_tokens``), so that the
  *sum* of the partials over TPxCP is the loss of the micro-batch.
- The partial, times its coefficient, rides on an activation through ``MoEAuxLossAutoScaler``:
  identity forward; backward feeds ``main_loss_backward_scale`` (set by megatron's schedule to
  1/num_microbatches, times cp size, or 1 with per-token loss) as the loss's gradient. Gradients of
  replicated parameters (router weights carry ``sequence_parallel=True``) are summed over TP by
  ``finalize_model_grads``, and averaged over DP by DDP, like the LM loss.
- With ``calculate_per_token_loss`` megatron scales the whole gradient by 1/num_tokens in
  ``finalize_model_grads``; the partial is multiplied by the local token count, as megatron does for
  its own aux losses, so the effective coefficient does not change.
- For logging, the unscaled partial goes into megatron's MoE tracker with ``reduce_group`` = TPxCP
  (summed there, then averaged over DP by ``reduce_aux_losses_tracker_across_ranks``).
"""
from __future__ import annotations

from typing import Optional

import torch

SPECIALIZATION_LOSS = "specialization_loss"
COUPLING_LOSS = "coupling_loss"
ORTHOGONALITY_LOSS = "orthogonality_loss"
VARIANCE_LOSS = "variance_loss"
LOSS_NAMES = (SPECIALIZATION_LOSS, COUPLING_LOSS, ORTHOGONALITY_LOSS, VARIANCE_LOSS)
"""Tracker names of the four losses; add them to megatron's ``track_names`` to have them logged."""


def global_valid_tokens(valid_T: torch.Tensor, group) -> torch.Tensor:
    """Number of valid tokens of the micro-batch summed over ``group`` (float, no gradient)."""
    count = valid_T.sum().to(torch.float32).detach().clone()
    if group is not None and torch.distributed.is_initialized() and group.size() > 1:
        torch.distributed.all_reduce(count, group=group)
    return count


def attach_loss(activation: torch.Tensor, coeff: float, partial: torch.Tensor,
                per_token_loss: bool, local_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Return ``activation`` carrying ``coeff * partial`` into the backward pass."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    loss = coeff * partial
    if per_token_loss:
        loss = loss * (local_tokens if local_tokens is not None else activation.shape[0])
    return MoEAuxLossAutoScaler.apply(activation, loss)


def log_loss(name: str, partial: torch.Tensor, layer_number: int, num_layers: int, reduce_group) -> None:
    """Record the (unscaled) partial for this layer in megatron's MoE tracker."""
    from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

    save_to_aux_losses_tracker(name, partial.detach().float(), layer_number, num_layers,
                               reduce_group=reduce_group)


def register_loss_names(names, num_layers: int, reduce_group, device=None) -> None:
    """Create the tracker entries of ``names`` (zeros) on this rank if they do not exist yet.

    megatron reduces the tracker over pipeline stages name by name; a stage that never recorded a
    name would skip that collective and hang the others. Every rank therefore registers every
    enabled name when the model is built, whether or not its stage has MoE layers.

    megatron-core >= 0.18 keeps the tracker in ``moe_logging.MoEMetricsTracker`` and its legacy
    ``get_moe_layer_wise_logging_tracker()`` returns a fresh dict copy (writing into it would
    register nothing), so the entries are created through the new tracker there.
    """
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:  # megatron-core < 0.18: the module-level dict is the tracker
        get_moe_metrics_tracker = None
    if get_moe_metrics_tracker is not None:
        metrics_tracker = get_moe_metrics_tracker()
        for name in names:
            if name not in metrics_tracker.metrics:
                metrics_tracker.ensure_initialized(name, num_layers, device=device or _tracker_device())
                metrics_tracker.metrics[name].reduce_group = reduce_group
        return

    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    for name in names:
        if name not in tracker:
            tracker[name] = {
                "values": torch.zeros(num_layers, device=device or _tracker_device()),
                "reduce_group": reduce_group,
                "avg_group": None,
                "reduce_group_has_dp": False,
            }


def _tracker_device():
    return torch.cuda.current_device() if torch.cuda.is_available() else torch.device("cpu")


def reduce_tracker(names=None, num_layers: int = None):
    """megatron's ``reduce_aux_losses_tracker_across_ranks`` made safe for any pipeline layout.

    megatron reduces its MoE tracker name by name over the pipeline group; a stage that never
    recorded a name (a stage without MoE layers lacks even ``load_balancing_loss``) would skip that
    collective and hang the others. This first agrees on the union of the names across all ranks
    (one ``all_gather_object``), creates the missing ones as zeros, then calls megatron's reduction.
    Returns the reduced tracker (``{name: {"values": [num_layers] tensor, ...}}``). A collective.
    """
    from megatron.core.transformer.moe.moe_utils import (
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    local = sorted(names if names is not None else tracker.keys())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, local)
        union = sorted(set().union(*everyone))
    else:
        union = local
    if num_layers is None:
        num_layers = max((len(v["values"]) for v in tracker.values()), default=0)
    for name in union:
        if name not in tracker:
            tracker[name] = {"values": torch.zeros(num_layers, device=_tracker_device()),
                             "reduce_group": None, "avg_group": None, "reduce_group_has_dp": False}
    reduce_aux_losses_tracker_across_ranks(union)
    return {name: tracker[name] for name in union}
