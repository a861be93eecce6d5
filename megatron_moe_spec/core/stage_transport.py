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


def pipeline_owner(config, layer_number: int) -> Tuple[int, int]:
    """(pipeline rank, virtual stage) that builds the 1-based global ``layer_number``."""
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
