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
  (summed there, then averaged over DP by megatron's reduction; ``moe_tracker`` is the one path to it).
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_moe_spec.core import moe_tracker

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
    moe_tracker.record(name, partial, layer_number, num_layers, reduce_group=reduce_group)


def register_loss_names(names, num_layers: int, reduce_group, device=None) -> None:
    """Create the tracker entries of ``names`` (zeros) on this rank if they do not exist yet.

    megatron reduces the tracker over pipeline stages name by name; a stage that never recorded a
    name would skip that collective and hang the others. Every rank therefore registers every
    enabled name when the model is built, whether or not its stage has MoE layers.
    """
    for name in names:
        if moe_tracker.ensure(name, num_layers, device=device):
            moe_tracker.set_groups(name, reduce_group=reduce_group)


def reduce_tracker(names=None, num_layers: int = None):
    """megatron's tracker reduction made safe for any pipeline layout (``moe_tracker.reduce_union``).

    Returns ``{name: reduced [num_layers] tensor}``. A collective.
    """
    return moe_tracker.reduce_union(names, num_layers)
