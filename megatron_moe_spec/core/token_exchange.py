"""Bring the k expert rows of each token back to the token's own rank, side by side.

R_sp and L_o compare the k experts that processed one token. Under expert parallelism those experts
live on different ranks, so the rows (each expert's z or y for that token) must travel back to the
rank that owns the token. We reuse the dispatcher's own combine path, which already knows how to
return rows to their tokens, but stop it before the sum over a token's k rows:

- **alltoall** dispatcher: ``combine_preprocess`` (un-sort by local expert, reduce-scatter over expert
  TP) and ``token_combine`` (the all-to-all back). The result is in the source rank's *permuted* order
  (expert-major, ascending token index, megatron's ``permute``), whose (token, expert) of every row the
  source rank knows from its routing map; we scatter it into [T, k, W].
- **allgather** dispatcher: its combine sums a token's rows locally *before* communicating, so each
  row is first placed in its own slot block of a [R, k*W] buffer; the sum then concatenates the k
  blocks, and the reduce-scatter returns [T, k*W] to the owner.

Expert-tensor-parallel shards of z (F split over ETP ranks) are placed at their offset in a full-F
block so that the combine's reduce-scatter over ETP sums disjoint pieces: the full z arrives, exactly.
Rows that are partial sums over ETP (y, the fc2 output) are combined as the dispatcher combines them.

Everything is autograd-transparent: gradients of a loss on the [T, k, W] result flow back through the
combine's own backward (the dispatch path) to the expert rows.

Slot order: a token's experts in ascending expert index. The losses are symmetric in the slots.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_moe_spec.core.routing_record import RoutingRecord


class ExchangeNotSupported(NotImplementedError):
    pass


def place_shard(rows_RW: torch.Tensor, offset: int, full_width: int) -> torch.Tensor:
    """[R, w] -> [R, full_width] with the rows at columns [offset, offset + w), zeros elsewhere."""
    width = rows_RW.shape[-1]
    if width == full_width:
        return rows_RW
    return torch.nn.functional.pad(rows_RW, (offset, full_width - offset - width))


def slot_of_selected(routing_map_TE: torch.Tensor) -> torch.Tensor:
    """[T, E] long: position of each selected expert among its token's selected experts."""
    return torch.cumsum(routing_map_TE.long(), dim=1) - 1


def rows_to_tokens(dispatcher, rows_RW: torch.Tensor, record: RoutingRecord,
                   global_routing_map_TE: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Expert rows (this rank's experts, dispatcher order) -> [T_local, k, W] for this rank's tokens.

    ``global_routing_map_TE`` is the all-gathered routing map the allgather dispatcher worked with
    (it clears it after dispatch; the MoE layer keeps a reference). Unused for alltoall.
    """
    from megatron.core.transformer.moe.token_dispatcher import (
        MoEAllGatherTokenDispatcher,
        MoEAlltoAllTokenDispatcher,
    )

    if isinstance(dispatcher, MoEAlltoAllTokenDispatcher):
        return _alltoall_rows_to_tokens(dispatcher, rows_RW, record)
    if isinstance(dispatcher, MoEAllGatherTokenDispatcher):
        return _allgather_rows_to_tokens(dispatcher, rows_RW, record, global_routing_map_TE)
    raise ExchangeNotSupported(
        f"moe_token_dispatcher_type of {type(dispatcher).__name__} is not supported with R_sp, L_o or "
        "the activation-similarity metric: use moe_token_dispatcher_type alltoall or allgather"
    )


def _alltoall_rows_to_tokens(dispatcher, rows_RW, record: RoutingRecord) -> torch.Tensor:
    if getattr(dispatcher, "drop_and_pad", False):
        raise ExchangeNotSupported(
            "moe_pad_expert_input_to_capacity is not supported with R_sp / L_o: set it to false "
            "(capacity dropping without padding is supported)"
        )
    if getattr(dispatcher.config, "moe_router_padding_for_quantization", False):
        raise ExchangeNotSupported(
            "moe_router_padding_for_quantization is not supported with R_sp / L_o"
        )
    rows = dispatcher.combine_preprocess(rows_RW)
    rows = dispatcher.token_combine(rows)  # [N_permuted, W] in this rank's permuted order
    routing_map = dispatcher.routing_map
    expert_idx, token_idx = routing_map.T.nonzero(as_tuple=True)  # expert-major, tokens ascending
    slot = slot_of_selected(routing_map)[token_idx, expert_idx]
    num_tokens, k, width = routing_map.shape[0], record.topk, rows.shape[-1]
    out = rows.new_zeros(num_tokens, k, width)
    return out.index_put((token_idx, slot), rows)


def _allgather_rows_to_tokens(dispatcher, rows_RW, record: RoutingRecord,
                              global_routing_map_TE: torch.Tensor) -> torch.Tensor:
    assert global_routing_map_TE is not None, "the allgather exchange needs the gathered routing map"
    k, width = record.topk, rows_RW.shape[-1]
    first = dispatcher.local_expert_indices[0]
    local_map = dispatcher.local_map  # [T_global, E_local]
    local_expert, token_idx = local_map.T.nonzero(as_tuple=True)
    slot = slot_of_selected(global_routing_map_TE)[token_idx, local_expert + first]
    # Each row into its own slot block: [R, k, W] -> [R, k*W].
    blocks = rows_RW.new_zeros(rows_RW.shape[0], k, width)
    blocks = blocks.index_put((torch.arange(rows_RW.shape[0], device=rows_RW.device), slot), rows_RW)
    blocks = blocks.view(rows_RW.shape[0], k * width)
    saved_shape = dispatcher.hidden_shape_before_permute
    dispatcher.hidden_shape_before_permute = torch.Size((saved_shape[0], k * width))
    try:
        summed = dispatcher.combine_preprocess(blocks)  # [T_global, k*W]: blocks are disjoint
    finally:
        dispatcher.hidden_shape_before_permute = saved_shape
    tokens = dispatcher.token_combine(summed)  # [T_local, k*W]
    return tokens.view(tokens.shape[0], k, width)
