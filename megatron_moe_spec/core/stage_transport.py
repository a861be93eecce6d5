"""R_cp across pipeline stages: the side channel that carries a pair's top-k mass between stages.

When the two MoE layers l, l' of an R_cp pair live on different pipeline stages (or virtual-pipeline
model chunks), megatron's p2p moves only the hidden states. This module moves what R_cp needs:

- **forward**, in the first forward pass of each micro-batch: the stage of l sends ``[3, T]`` fp32
  (M^l, valid^l, top-1^l) to the stage of l';
- **backward**: the stage of l' sends dR/dM^l ([T] fp32, already times the coefficient and megatron's
  loss scale) back, and the stage of l injects it into M^l's graph (:class:`InjectGradient`).

So T values travel each way per pair and micro-batch, never hidden states. Transfers go over a
dedicated gloo group per pipeline group (CPU tensors: the side channel cannot interleave with
megatron's own p2p on the NCCL/gloo pipeline group), matched by source and tag, one tag per pair and
direction; in each (source, tag) stream both sides post in micro-batch order (megatron's schedules
run each model chunk's forwards, and its backwards, in micro-batch order), so no global state pairs
them. Sends are asynchronous (a send never blocks a stage); receives block until the peer's send,
which the schedule's own data dependencies have already produced.
"""
from __future__ import annotations

import datetime
import os
from typing import Dict, List, Optional, Tuple

import torch

TIMEOUT_S = int(os.environ.get("MMS_CP_PIPELINE_TIMEOUT", "600"))
"""A side-channel receive that waits longer than this raises (a mismatch never hangs forever)."""

_GROUPS: Dict[Tuple[int, ...], object] = {}
_PENDING: List[object] = []


def pipeline_owner(config, layer_number: int, hybrid_layer_pattern: Optional[str] = None) -> Tuple[int, int]:
    """(pipeline rank, virtual stage) that builds the 1-based global ``layer_number``.

    ``hybrid_layer_pattern``: a HybridModel's pattern (its layers are placed by the pattern's ``|``
    segments, :func:`hybrid_pipeline_segments`); None for a GPTModel (megatron's
    ``get_transformer_layer_offset`` / ``get_num_layers_to_build`` rule)."""
    if hybrid_layer_pattern is not None:
        for rank, vp, offset, count in hybrid_pipeline_segments(config, hybrid_layer_pattern):
            if offset < layer_number <= offset + count:
                return rank, vp
        raise ValueError(f"layer {layer_number} of hybrid_layer_pattern {hybrid_layer_pattern!r} is built "
                         "by no pipeline stage")
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pp = config.pipeline_model_parallel_size or 1
    vpp = config.virtual_pipeline_model_parallel_size or 1
    for rank in range(pp):
        for vp in range(vpp):
            vp_stage = vp if vpp > 1 else None
            offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=rank)
            count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=rank)
            if offset < layer_number <= offset + count:
                return rank, vp
    raise ValueError(f"layer {layer_number} is built by no pipeline stage")


def hybrid_pipeline_segments(config, pattern: str) -> List[Tuple[int, int, int, int]]:
    """``[(pipeline rank, virtual stage, layer offset, layer count)]``: where a HybridModel with the
    ``hybrid_layer_pattern`` ``pattern`` builds its main-decoder layers, one row per model chunk.

    megatron-core's rule (``hybrid_layer_allocation.select_pipeline_segment``, called by each chunk's
    HybridModel with its own process group; tests/test_hybrid_parity.py checks this function against
    it): with ``|`` in the pattern, segment ``i`` is built by pipeline rank ``i % pp`` as virtual stage
    ``i // pp``; without ``|`` and ``pp > 1`` (deprecated by megatron) the layers are split evenly, or
    by ``num_layers_in_first/last_pipeline_stage``, without virtual stages.

    Raises ``ValueError`` when some layer would be built by no stage or megatron refuses the layout:
    every segment must be one model chunk (``|`` segments = pipeline_model_parallel_size x
    virtual_pipeline_model_parallel_size).
    """
    pp = config.pipeline_model_parallel_size or 1
    vpp = config.virtual_pipeline_model_parallel_size or 1
    first = getattr(config, "num_layers_in_first_pipeline_stage", None)
    last = getattr(config, "num_layers_in_last_pipeline_stage", None)
    main = pattern.split("/")[0]
    segments = main.split("|")
    if len(segments) > 1:
        if first is not None or last is not None:
            raise ValueError(
                f"hybrid_layer_pattern {pattern!r} has '|' segments: unset "
                "num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage (the segments "
                "place the layers)")
        if len(segments) != pp * vpp or pp == 1:
            raise ValueError(
                f"hybrid_layer_pattern {pattern!r} has {len(segments)} '|' pipeline segments, but "
                f"pipeline_model_parallel_size x virtual_pipeline_model_parallel_size is {pp} x {vpp}: "
                "megatron builds segment vp * pp + rank as each model chunk, so give the pattern "
                "pp x vpp segments with pp > 1, or remove the '|' separators")
        rows, offset = [], 0
        for index, segment in enumerate(segments):
            rows.append((index % pp, index // pp, offset, len(segment)))
            offset += len(segment)
        return rows
    num_layers = len(main)
    if pp == 1:
        if vpp > 1:
            raise ValueError("virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1")
        return [(0, 0, 0, num_layers)]
    if vpp > 1:
        raise ValueError(
            f"hybrid_layer_pattern {pattern!r} has no '|': megatron refuses virtual pipeline stages "
            f"then; mark the {pp * vpp} model chunks with '|'")
    if first is None and last is None:
        if num_layers % pp:
            raise ValueError(
                f"hybrid_layer_pattern {pattern!r}: {num_layers} layers do not split evenly over "
                f"pipeline_model_parallel_size {pp}; mark the stages with '|'")
        per = num_layers // pp
        return [(rank, 0, rank * per, per) for rank in range(pp)]
    middle_stages = pp - (first is not None) - (last is not None)
    middle = num_layers - (first or 0) - (last or 0)
    if middle_stages and middle % middle_stages:
        raise ValueError(
            f"hybrid_layer_pattern {pattern!r}: the {middle} middle layers do not split evenly over "
            f"{middle_stages} middle pipeline stages; mark the stages with '|'")
    per = middle // middle_stages if middle_stages else 0
    rows = []
    for rank in range(pp):
        if first is not None and rank == 0:
            rows.append((rank, 0, 0, first))
        elif last is not None and rank == pp - 1:
            rows.append((rank, 0, num_layers - last, last))
        else:
            middle_rank = rank if first is None else rank - 1
            rows.append((rank, 0, middle_rank * per + (first or 0), per))
    return rows


def ensure_side_groups() -> None:
    """Create the gloo side-channel groups (one per pipeline group). A collective over the world:
    every rank calls it once, when the model spec is built (later calls do nothing)."""
    from megatron.core import parallel_state

    if _GROUPS or not torch.distributed.is_initialized():
        return
    mine = tuple(torch.distributed.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()))
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    for ranks in sorted(set(everyone)):
        group = torch.distributed.new_group(list(ranks), backend="gloo",
                                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
        if ranks == mine:
            _GROUPS[mine] = group
    if mine not in _GROUPS:  # pragma: no cover - all_gather_object returned our own tuple
        raise RuntimeError("megatron-moe-spec: no side-channel group for this pipeline group")


def _peer(pipeline_rank: int) -> Tuple[object, int]:
    """(side-channel group, global rank of the stage ``pipeline_rank`` of this pipeline group)."""
    from megatron.core import parallel_state

    ranks = tuple(torch.distributed.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()))
    if ranks not in _GROUPS:
        raise RuntimeError(
            "megatron-moe-spec: R_cp across pipeline stages needs its side channel, created when the "
            "layer spec is built (layer_specs.get_moe_block_spec / specialize_block_spec) on every rank")
    return _GROUPS[ranks], ranks[pipeline_rank]


def tag(consumer_layer: int, backward: bool) -> int:
    """One stream per pair (named by its later layer) and direction."""
    return 2 * consumer_layer + int(backward)


def send(values: torch.Tensor, pipeline_rank: int, stream: int) -> None:
    group, dst = _peer(pipeline_rank)
    work = torch.distributed.isend(values.detach().float().cpu().contiguous(), dst, group=group, tag=stream)
    _PENDING[:] = [w for w in _PENDING if not w.is_completed()]
    _PENDING.append(work)


def recv(shape, pipeline_rank: int, stream: int, device) -> torch.Tensor:
    group, src = _peer(pipeline_rank)
    buffer = torch.empty(shape, dtype=torch.float32)
    try:
        torch.distributed.recv(buffer, src, group=group, tag=stream)
    except RuntimeError as error:
        raise RuntimeError(
            f"R_cp across pipeline stages (cp_pipeline: exact): nothing arrived from global rank {src} "
            f"on stream {stream} (pair ending at layer {stream // 2 - 1}, 0-based; "
            f"{'backward' if stream % 2 else 'forward'}) within {TIMEOUT_S} s "
            "(MMS_CP_PIPELINE_TIMEOUT). The stages disagree on which micro-batches run R_cp: are all "
            "stages in the same train/eval mode, and is cp_pipeline the same everywhere?") from error
    return buffer.to(device)


def finish_sends() -> None:
    """Wait for this rank's sends of the last step (all were received within it)."""
    while _PENDING:
        _PENDING.pop(0).wait()


class InjectGradient(torch.autograd.Function):
    """Identity on ``activation``; in backward, receives dR/dM from the stage of the pair's later layer
    and hands it to ``mass_T`` (the stage of layer l's side of a cross-stage R_cp pair)."""

    @staticmethod
    def forward(ctx, activation: torch.Tensor, mass_T: torch.Tensor, pipeline_rank: int, stream: int):
        ctx.shape, ctx.device, ctx.peer, ctx.stream = mass_T.shape, mass_T.device, pipeline_rank, stream
        ctx.dtype = mass_T.dtype
        return activation

    @staticmethod
    def backward(ctx, grad_activation):
        grad_mass = recv(ctx.shape, ctx.peer, ctx.stream, ctx.device).to(ctx.dtype)
        return grad_activation, grad_mass, None, None


def send_gradient_hook(pipeline_rank: int, stream: int):
    """A tensor hook that sends the gradient of a received M^l back to the stage of layer l."""

    def hook(grad: torch.Tensor) -> Optional[torch.Tensor]:
        send(grad, pipeline_rank, stream)
        return None

    return hook
