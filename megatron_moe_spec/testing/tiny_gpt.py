"""A tiny megatron-core GPT with MoE, one training step, and its gradients gathered across shards.

The parity tests run :func:`train_step_result` under several parallel layouts (through
``run_distributed``) and compare the results with a one-process run. Everything here is megatron-core's
own machinery: ``GPTModel`` from a layer spec, ``DistributedDataParallel``, the pipeline schedules'
``get_forward_backward_func`` and ``finalize_model_grads``. The full (unsharded) gradients are
assembled from megatron's ``sharded_state_dict``: the same global layout its distributed checkpoints
use, so TP, EP, ETP, PP and the SwiGLU shard interleave are all undone by megatron's own metadata.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch


@dataclass
class TinyGPTSettings:
    """Shape and MoE options of the tiny model, and the data of one step."""

    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 128
    num_moe_experts: int = 8
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int = 64
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_layer_freq: Any = 1
    moe_token_dispatcher_type: str = "alltoall"
    moe_aux_loss_coeff: float = 1e-2
    moe_z_loss_coeff: Optional[float] = None
    moe_router_load_balancing_type: str = "aux_loss"
    moe_router_score_function: str = "softmax"
    moe_shared_expert_overlap: bool = False
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[List[str]] = None
    calculate_per_token_loss: bool = False
    extra_config: Dict[str, Any] = field(default_factory=dict)
    """Any other TransformerConfig field (e.g. group-limited routing options)."""
    hybrid_layer_pattern: Optional[str] = None
    """Build megatron-core's HybridModel (>= 0.19) with this ``hybrid_layer_pattern`` instead of a
    GPTModel; ``num_layers`` and ``moe_layer_freq`` are then ignored (the pattern says both). The
    layer spec function must return a hybrid stack spec (e.g. ``core.hybrid.get_hybrid_stack_spec``)."""

    vocab_size: int = 128
    seq_length: int = 16
    micro_batch_size: int = 2
    num_microbatches: int = 1
    """Micro-batches per data-parallel rank."""
    data_seed: int = 7

    def replace(self, **changes) -> "TinyGPTSettings":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- model
def build_transformer_config(settings: TinyGPTSettings):
    """A ``TransformerConfig`` for the current parallel state (sequence parallel iff TP > 1)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_spec.cpu import cpu_model_config_overrides

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    kwargs = dict(
        num_layers=settings.num_layers,
        hidden_size=settings.hidden_size,
        num_attention_heads=settings.num_attention_heads,
        ffn_hidden_size=settings.ffn_hidden_size,
        num_moe_experts=settings.num_moe_experts,
        moe_router_topk=settings.moe_router_topk,
        moe_ffn_hidden_size=settings.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=settings.moe_shared_expert_intermediate_size,
        moe_shared_expert_overlap=settings.moe_shared_expert_overlap,
        moe_layer_freq=settings.moe_layer_freq,
        moe_token_dispatcher_type=settings.moe_token_dispatcher_type,
        moe_aux_loss_coeff=settings.moe_aux_loss_coeff,
        moe_z_loss_coeff=settings.moe_z_loss_coeff,
        moe_router_load_balancing_type=settings.moe_router_load_balancing_type,
        moe_router_score_function=settings.moe_router_score_function,
        moe_grouped_gemm=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        sequence_parallel=tp > 1,
        recompute_granularity=settings.recompute_granularity,
        recompute_method=settings.recompute_method,
        recompute_num_layers=settings.recompute_num_layers,
        calculate_per_token_loss=settings.calculate_per_token_loss,
        **cpu_model_config_overrides(),
    )
    if settings.recompute_modules is not None:
        kwargs["recompute_modules"] = settings.recompute_modules
    if settings.hybrid_layer_pattern is not None:
        main = settings.hybrid_layer_pattern.split("/")[0].replace("|", "")
        kwargs.update(num_layers=len(main), is_hybrid_model=True)
    kwargs.update(settings.extra_config)
    return TransformerConfig(**kwargs)


def default_layer_spec(config, vp_stage=None):
    """megatron-core's own GPT block spec with local (non-TE) modules."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage)


def build_model(config, settings: TinyGPTSettings, layer_spec_fn: Callable = default_layer_spec,
                wrap_ddp: bool = True) -> List[torch.nn.Module]:
    """The model chunks of this rank (one per virtual pipeline stage), DDP-wrapped."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    chunks = []
    for vp_stage in range(vpp):
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        common = dict(config=config, vocab_size=settings.vocab_size, max_sequence_length=settings.seq_length,
                      pre_process=pre, post_process=post, share_embeddings_and_output_weights=False,
                      position_embedding_type="rope", vp_stage=vp_stage if vpp > 1 else None)
        if settings.hybrid_layer_pattern is not None:
            # One stack spec for every chunk: HybridModel picks its chunk's '|' segment itself.
            from megatron.core.models.hybrid.hybrid_model import HybridModel

            chunks.append(HybridModel(hybrid_stack_spec=layer_spec_fn(config),
                                      hybrid_layer_pattern=settings.hybrid_layer_pattern, **common))
        else:
            spec = layer_spec_fn(config, vp_stage=vp_stage if vpp > 1 else None)
            chunks.append(GPTModel(transformer_layer_spec=spec, **common))
    if not wrap_ddp:
        return chunks
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]


# ----------------------------------------------------------------------------- data
def global_microbatches(settings: TinyGPTSettings, data_parallel_size: int) -> List[Dict[str, torch.Tensor]]:
    """All micro-batches of one step, for every data-parallel rank (dp-major order)."""
    generator = torch.Generator().manual_seed(settings.data_seed)
    total = data_parallel_size * settings.num_microbatches
    batches = []
    for _ in range(total):
        tokens = torch.randint(0, settings.vocab_size, (settings.micro_batch_size, settings.seq_length + 1),
                               generator=generator)
        batches.append(
            {
                "tokens": tokens[:, :-1].contiguous(),
                "labels": tokens[:, 1:].contiguous(),
                "loss_mask": torch.ones(settings.micro_batch_size, settings.seq_length),
                "position_ids": torch.arange(settings.seq_length).expand(settings.micro_batch_size, -1).contiguous(),
            }
        )
    return batches


def local_microbatches(settings: TinyGPTSettings) -> List[Dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches. A one-process run sees every rank's data."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    m = settings.num_microbatches
    return global_microbatches(settings, dp)[rank * m : (rank + 1) * m]


# ----------------------------------------------------------------------------- one step
def lm_forward_step(data_iterator: Iterator, model: torch.nn.Module, lm_weight: float = 1.0):
    """megatron's forward-step contract: returns (output, loss_func).

    ``lm_weight`` multiplies the LM loss handed to the schedule: 0 leaves only the auxiliary losses
    (which megatron's aux-loss autoscaler injects with the schedule's own scale, whatever the LM
    loss) in the gradient, with the token count and the reported LM loss unchanged."""
    batch = next(data_iterator)
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=None,
        labels=batch["labels"],
    )
    loss_mask = batch["loss_mask"]

    def loss_func(per_token_loss: torch.Tensor):
        # megatron's 3-tuple contract: (sum of token losses, number of tokens, what to report);
        # the schedule divides by the token count itself unless calculate_per_token_loss is on.
        losses = per_token_loss.float().view(-1)
        mask = loss_mask.view(-1).float()
        loss_sum = torch.sum(losses * mask)
        num_tokens = mask.sum().to(torch.int)
        return loss_sum * lm_weight, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}

    return output, loss_func


def run_step(model_chunks, config, batches: List[Dict[str, torch.Tensor]], settings: TinyGPTSettings,
             forward_step: Callable = lm_forward_step) -> List[Dict[str, torch.Tensor]]:
    """One forward/backward over ``batches`` with megatron's schedule and grad finalization."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config.finalize_model_grads_func = finalize_model_grads
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    if len(model_chunks) > 1:
        iterators = [iter(batches) for _ in model_chunks]
    else:
        iterators = iter(batches)
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(batches),
        seq_length=settings.seq_length,
        micro_batch_size=settings.micro_batch_size,
        forward_only=False,
    )


# ----------------------------------------------------------------------------- gathering shards
def gather_full_tensors(model_chunks, which: str = "grad") -> Dict[str, torch.Tensor]:
    """Every parameter (``which="param"``) or its gradient (``"grad"``) as the full, unsharded tensor.

    Uses megatron's ``sharded_state_dict`` metadata (global shape and offset of each local shard),
    collects all shards on every rank and assembles them. Keys are megatron's checkpoint keys, which
    do not depend on the parallel layout.
    """
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    shards = []
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        originals = {}
        if which == "grad":
            for p in module.parameters():
                grad = getattr(p, "main_grad", None)
                if grad is None:
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                originals[p] = p.data
                p.data = grad.to(p.dtype)
        try:
            state = module.sharded_state_dict()
            apply_factories(state)
            for value in nested_values(state):
                if not isinstance(value, ShardedTensor) or value.data is None:
                    continue
                if "_extra_state" in value.key:
                    continue
                assert value.flattened_range is None
                shards.append((value.key, tuple(value.global_shape), tuple(value.global_offset),
                               value.prepend_axis_num, _replica_is_main(value.replica_id),
                               value.data.detach().clone()))
        finally:
            for p, data in originals.items():
                p.data = data

    if dist.is_initialized() and dist.get_world_size() > 1:
        everything = [None] * dist.get_world_size()
        dist.all_gather_object(everything, shards)
        shards = [s for rank_shards in everything for s in rank_shards]

    full: Dict[str, torch.Tensor] = {}
    filled: Dict[str, torch.Tensor] = {}
    for key, global_shape, global_offset, prepend, is_main, data in shards:
        if key not in full:
            full[key] = torch.zeros(global_shape, dtype=data.dtype)
            filled[key] = torch.zeros(global_shape, dtype=torch.bool)
        local = data.reshape((1,) * prepend + tuple(data.shape))
        index = tuple(slice(o, o + n) for o, n in zip(global_offset, local.shape))
        if is_main:
            full[key][index] = local
            filled[key][index] = True
    for key, mask in filled.items():
        if not bool(mask.all()):
            raise AssertionError(f"gather_full_tensors: {key} is not fully covered by the shards")
    return full


@torch.no_grad()
def load_full_tensors(model_chunks, full: Dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) parameters into this rank's shards: the inverse of
    :func:`gather_full_tensors`, through the same ``sharded_state_dict`` metadata."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        state = module.sharded_state_dict()
        apply_factories(state)
        for value in nested_values(state):
            if not isinstance(value, ShardedTensor) or value.data is None or "_extra_state" in value.key:
                continue
            local_shape = (1,) * value.prepend_axis_num + tuple(value.data.shape)
            index = tuple(slice(o, o + n) for o, n in zip(value.global_offset, local_shape))
            value.data.copy_(full[value.key][index].reshape(value.data.shape))


def _replica_is_main(replica_id) -> bool:
    if isinstance(replica_id, int):
        return replica_id == 0
    return all(r == 0 for r in replica_id)


# ----------------------------------------------------------------------------- the parity unit
def train_step_result(settings: TinyGPTSettings, layer_spec_fn: Callable = default_layer_spec,
                      initial_params: Optional[Dict[str, torch.Tensor]] = None,
                      alone: Optional[Dict[str, Callable]] = None) -> Dict[str, Any]:
    """Build the model in the current parallel state, run one step, return what parity compares.

    ``initial_params`` (full tensors, e.g. a one-process run's ``"params"``) are loaded into the shards
    first, so every layout starts from the same weights (CPU initialization alone does not give that
    under expert parallelism: each EP rank draws its local experts from the same generator state).

    Returns ``{"lm_loss": float (token-weighted mean over all micro-batches of all DP ranks),
    "grads": {key: full tensor}, "params": {key: full tensor}}``; identical on every rank.

    ``alone``: ``{name: layer_spec_fn}``, typically one loss on in each; for each, the same step with
    only that spec's losses (:func:`losses_only_grads`) adds ``"alone_grads": {name: {key: full
    tensor}}``: a loss's own gradient, which a comparison of the full gradient can hide under the
    LM's (or a larger loss's) share.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    config = build_transformer_config(settings)
    torch.manual_seed(1234)
    chunks = build_model(config, settings, layer_spec_fn)
    _register_metrics(config, layer_spec_fn, settings.hybrid_layer_pattern)
    if initial_params is not None:
        load_full_tensors(chunks, initial_params)
    params = gather_full_tensors(chunks, "param")
    losses = run_step(chunks, config, local_microbatches(settings), settings)

    # Token-weighted LM loss over this rank's micro-batches (last stage only), then over DP.
    totals = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
        for item in losses:
            totals += item["lm loss"].double()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
        # Each DP replica of the last stage counted its own tokens once: totals are global sums.
    result = {
        "lm_loss": float(totals[0] / totals[1]),
        "grads": gather_full_tensors(chunks, "grad"),
        "params": params,
        "tracker": tracker_values(settings.num_microbatches, config.num_layers),
        "metrics": _report_metrics(),
    }
    if alone:
        full_params = gather_full_tensors(chunks, "param")
        result["alone_grads"] = {name: losses_only_grads(settings, fn, full_params) for name, fn in alone.items()}
    return result


def losses_only_grads(settings: TinyGPTSettings, layer_spec_fn: Callable,
                      params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The gradient of the spec's losses alone: a model built with ``layer_spec_fn`` and loaded with
    ``params`` (full tensors) takes one step with the LM loss weighted 0 and megatron's load-balancing
    and z losses off. Returns the full (gathered) gradients; leaves megatron's tracker cleared."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    quiet = settings.replace(moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none", moe_z_loss_coeff=None)
    config = build_transformer_config(quiet)
    chunks = build_model(config, quiet, layer_spec_fn)
    load_full_tensors(chunks, params)
    run_step(chunks, config, local_microbatches(quiet), quiet,
             forward_step=functools.partial(lm_forward_step, lm_weight=0.0))
    grads = gather_full_tensors(chunks, "grad")
    clear_aux_losses_tracker()
    return grads


def _register_metrics(config, layer_spec_fn, hybrid_layer_pattern: Optional[str] = None) -> None:
    """Metrics need every MoE layer's statistics on every rank (see core.layer_metrics)."""
    spec_config = getattr(layer_spec_fn, "keywords", {}).get("spec_config")
    if spec_config is None or not spec_config.metrics:
        return
    from megatron_moe_spec.core import layer_metrics
    from megatron_moe_spec.core.layer_specs import moe_layer_numbers

    layer_metrics.register_layers(moe_layer_numbers(config, hybrid_layer_pattern), config.num_moe_experts)


def tracker_values(num_microbatches: int, num_layers: int = None) -> Dict[str, List[float]]:
    """megatron's MoE tracker after the cross-rank reduction, per micro-batch, then cleared.

    Every rank must call this (the reduction is a collective). ``z_loss`` is left out: megatron-core
    0.16 records it without a reduce group, so its logged value differs across TP ranks.
    """
    from megatron_moe_spec.core import moe_tracker

    reduced = moe_tracker.reduce_union(num_layers=num_layers)
    values = {n: (v.double() / num_microbatches).tolist() for n, v in reduced.items() if n != "z_loss"}
    moe_tracker.clear()
    return values


def _report_metrics():
    from megatron_moe_spec.core import layer_metrics

    if not layer_metrics.registered_layers():
        return {}
    return layer_metrics.report()
