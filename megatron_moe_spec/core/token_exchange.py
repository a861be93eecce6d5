"""Bring the k expert rows of each token back to the token's own rank, side by side.

R_sp and L_o compare the k experts that processed one token. Under expert parallelism those experts
live on different ranks, so the rows (each expert's z or y for that token) must travel back to the
rank that owns the token. We reuse the dispatcher's own combine path, which already knows how to
return rows to their tokens, but stop it before the sum over a token's k rows:

- **alltoall** dispatcher: ``combine_preprocess`` (un-sort by local expert, reduce-scatter over expert
  TP) and ``token_combine`` (the all-to-all back). The result is in the source rank's *permuted* order
  (expert-major, ascending token index, megatron's ``permute``), whose (token, expert) of every row the
  source rank knows from its routing map; we place it into [T, k, W] (``rows_to_slots``).
- **allgather** dispatcher: its combine sums a token's rows locally *before* communicating, so each
  row is first placed in its own slot block of a [R, k*W] buffer; the sum then concatenates the k
  blocks, and the reduce-scatter returns [T, k*W] to the owner.

Expert-tensor-parallel shards of z (F split over ETP ranks) are placed at their offset in a full-F
block so that the combine's reduce-scatter over ETP sums disjoint pieces: the full z arrives, exactly.
Rows that are partial sums over ETP (y, the fc2 output) are combined as the dispatcher combines them.

Everything is autograd-transparent: gradients of a loss on the [T, k, W] result flow back through the
combine's own backward (the dispatch path) to the expert rows.

**Selected tokens only** (``select_T``, the ``sp_max_tokens`` subset; alltoall dispatcher with EP > 1):
the token's rank knows which of its permuted rows belong to selected tokens. It sends that mask (one
byte per row) forward with the dispatcher's own EP splits (the direction of its token dispatch), so
the expert side holds it in the order of ``combine_preprocess``'s output; the expert side keeps only
those rows and an all-to-all whose splits are the selected counts returns them. Both sides compute the
counts from the mask they hold (no extra metadata). Its backward (megatron's autograd ``all_to_all``)
returns only the selected rows' gradients. Rows of unselected tokens come back as zeros; the losses
mask them. ``combine_preprocess`` itself (the un-sort, and the reduce-scatter over expert TP) stays
full-width: it is local or within the expert-TP group. The allgather dispatcher, and EP = 1, keep the
full exchange (see docs/parallelism.md).

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


class _RowsToSlots(torch.autograd.Function):
    """out[dest[n]] = rows[n] in a zero [D, W] buffer (``dest`` unique): a gather both ways.

    Forward gathers each slot's source row (``index_select``; the empty slots are zeroed, one more pass,
    only when there are fewer rows than slots); backward gathers each row's slot gradient. Neither
    direction scatters, so both are deterministic on every device, and only ``dest`` ([N] indices) is
    saved. (``index_put`` of whole rows with 2-D indices, the straightforward way, writes element by
    element and costs several times more on CPU; see docs/overhead.md.)
    """

    @staticmethod
    def forward(ctx, rows_NW: torch.Tensor, dest_N: torch.Tensor, num_slots: int):
        n = rows_NW.shape[0]
        ctx.save_for_backward(dest_N)
        if n == 0:  # e.g. an EP rank none of whose tokens' rows were selected
            return rows_NW.new_zeros((num_slots,) + tuple(rows_NW.shape[1:]))
        src_D = torch.full((num_slots,), -1, dtype=torch.long, device=rows_NW.device)
        src_D[dest_N] = torch.arange(n, device=rows_NW.device)
        out_DW = rows_NW.index_select(0, src_D.clamp(min=0))
        if n < num_slots:  # some slots have no row (n == num_slots with unique dest: every slot has one)
            out_DW.masked_fill_((src_D < 0).unsqueeze(-1), 0)
        return out_DW

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_DW):
        (dest_N,) = ctx.saved_tensors
        return grad_DW.index_select(0, dest_N), None, None


def rows_to_slots(rows_NW: torch.Tensor, dest_N: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[N, W] rows -> [num_slots, W]: row n at ``dest_N[n]`` (unique, < num_slots), zeros elsewhere."""
    return _RowsToSlots.apply(rows_NW, dest_N, num_slots)


def slot_of_selected(routing_map_TE: torch.Tensor) -> torch.Tensor:
    """[T, E] long: position of each selected expert among its token's selected experts."""
    return torch.cumsum(routing_map_TE.long(), dim=1) - 1


def rows_to_tokens(dispatcher, rows_RW: torch.Tensor, record: RoutingRecord,
                   global_routing_map_TE: Optional[torch.Tensor] = None,
                   select_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Expert rows (this rank's experts, dispatcher order) -> [T_local, k, W] for this rank's tokens.

    ``global_routing_map_TE`` is the all-gathered routing map the allgather dispatcher worked with
    (it clears it after dispatch; the MoE layer keeps a reference). Unused for alltoall.
    ``select_T``: bool [T_local] or None. When given, only the rows of these tokens are needed: the
    others may come back as zeros (the alltoall dispatcher under EP > 1 then moves only the selected
    rows; see the module docstring). The same value on every rank of a layout is *not* required:
    each rank passes its own tokens' selection.
    """
    from megatron.core.transformer.moe.token_dispatcher import (
        MoEAllGatherTokenDispatcher,
        MoEAlltoAllTokenDispatcher,
    )

    if isinstance(dispatcher, MoEAlltoAllTokenDispatcher):
        return _alltoall_rows_to_tokens(dispatcher, rows_RW, record, select_T)
    if isinstance(dispatcher, MoEAllGatherTokenDispatcher):
        return _allgather_rows_to_tokens(dispatcher, rows_RW, record, global_routing_map_TE)
    raise ExchangeNotSupported(
        f"moe_token_dispatcher_type of {type(dispatcher).__name__} is not supported with R_sp, L_o or "
        "the activation-similarity metric: use moe_token_dispatcher_type alltoall or allgather"
    )


def _splits(value) -> list:
    """The dispatcher's split sizes (tensor, numpy array or list) as a list of ints."""
    return [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]


def _segment_counts(mask_N: torch.Tensor, splits: list) -> list:
    """How many True entries each consecutive chunk of ``splits`` rows holds (host ints)."""
    if not splits:
        return []
    return [int(c) for c in torch.stack([m.sum() for m in torch.split(mask_N.long(), splits)]).tolist()]


def selected_rows_exchange(dispatcher, rows_RW: torch.Tensor, rows_select_N: torch.Tensor) -> torch.Tensor:
    """The alltoall combine for the selected rows only: expert rows -> [n_selected, W] on the source.

    ``rows_select_N``: bool [N_permuted], this rank's permuted rows (expert-major, ascending token)
    whose token is selected. Returns the selected rows in that order (the autograd graph runs back
    through megatron's all_to_all and ``combine_preprocess``).
    """
    from megatron.core.tensor_parallel.mappings import all_to_all

    group = dispatcher.ep_group
    input_splits, output_splits = _splits(dispatcher.input_splits), _splits(dispatcher.output_splits)
    # Forward, as the token dispatch: the mask arrives in the order combine_preprocess produces.
    mask_M = all_to_all(group, rows_select_N.to(torch.uint8).contiguous(), output_splits, input_splits).bool()
    rows = dispatcher.combine_preprocess(rows_RW)  # [M, W]: un-sorted, reduce-scattered over expert TP
    send_counts = _segment_counts(mask_M, output_splits)  # to each source rank
    recv_counts = _segment_counts(rows_select_N, input_splits)  # from each expert rank
    return all_to_all(group, rows[mask_M], recv_counts, send_counts)


def _alltoall_rows_to_tokens(dispatcher, rows_RW, record: RoutingRecord,
                             select_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    if getattr(dispatcher, "drop_and_pad", False):
        raise ExchangeNotSupported(
            "moe_pad_expert_input_to_capacity is not supported with R_sp / L_o: set it to false "
            "(capacity dropping without padding is supported)"
        )
    if getattr(dispatcher.config, "moe_router_padding_for_quantization", False):
        raise ExchangeNotSupported(
            "moe_router_padding_for_quantization is not supported with R_sp / L_o"
        )
    routing_map = dispatcher.routing_map
    expert_idx, token_idx = routing_map.T.nonzero(as_tuple=True)  # expert-major, tokens ascending
    slot = slot_of_selected(routing_map)[token_idx, expert_idx]
    num_tokens, k, width = routing_map.shape[0], record.topk, rows_RW.shape[-1]
    if select_T is not None and dispatcher.ep_size > 1:
        rows_select_N = select_T.to(torch.bool)[token_idx]
        rows = selected_rows_exchange(dispatcher, rows_RW, rows_select_N)
        token_idx, slot = token_idx[rows_select_N], slot[rows_select_N]
    else:
        rows = dispatcher.combine_preprocess(rows_RW)
        rows = dispatcher.token_combine(rows)  # [N_permuted, W] in this rank's permuted order
    return rows_to_slots(rows, token_idx * k + slot, num_tokens * k).view(num_tokens, k, width)


def _allgather_rows_to_tokens(dispatcher, rows_RW, record: RoutingRecord,
                              global_routing_map_TE: torch.Tensor) -> torch.Tensor:
    assert global_routing_map_TE is not None, "the allgather exchange needs the gathered routing map"
    k, width = record.topk, rows_RW.shape[-1]
    first = dispatcher.local_expert_indices[0]
    local_map = dispatcher.local_map  # [T_global, E_local]
    local_expert, token_idx = local_map.T.nonzero(as_tuple=True)
    slot = slot_of_selected(global_routing_map_TE)[token_idx, local_expert + first]
    # Each row into its own slot block: [R, k, W] -> [R, k*W].
    num_rows = rows_RW.shape[0]
    dest = torch.arange(num_rows, device=rows_RW.device) * k + slot
    blocks = rows_to_slots(rows_RW, dest, num_rows * k).view(num_rows, k * width)
    saved_shape = dispatcher.hidden_shape_before_permute
    dispatcher.hidden_shape_before_permute = torch.Size((saved_shape[0], k * width))
    try:
        summed = dispatcher.combine_preprocess(blocks)  # [T_global, k*W]: blocks are disjoint
    finally:
        dispatcher.hidden_shape_before_permute = saved_shape
    tokens = dispatcher.token_combine(summed)  # [T_local, k*W]
    return tokens.view(tokens.shape[0], k, width)
