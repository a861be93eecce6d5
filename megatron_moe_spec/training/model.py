"""The model (GPTModel or HybridModel chunks with the specialization spec, DDP-wrapped), optimizer and
schedule.

One ``GPTModel`` per virtual pipeline stage of this rank (one chunk without the interleaved schedule),
each built from ``core.layer_specs.get_moe_block_spec``: megatron's own GPT block spec with the
specialization router / MoE layer / transformer layer substituted in (stock megatron when every loss
and the metrics are off). With ``model.hybrid_layer_pattern`` a ``HybridModel`` per virtual stage
instead (megatron-core >= 0.19), from ``core.hybrid.get_hybrid_stack_spec``: megatron's hybrid stack
spec with the same substitution in its ``moe_layer``; each chunk builds its ``|`` segment of the
pattern. Wrapped in megatron's ``DistributedDataParallel``; optimizer from
``get_megatron_optimizer`` (separate dense and expert optimizers, chained), schedule from
``OptimizerParamScheduler`` stepped once per iteration.
"""
from __future__ import annotations

from typing import List, Tuple

import torch


def build_transformer_config(cfg, cuda: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_spec.run_config import megatron_config_kwargs

    kwargs = megatron_config_kwargs(cfg, cpu=not cuda)
    # Initialize weights as on a GPU, through megatron's model-parallel RNG tracker (the CPU backend
    # forks the CPU generator for it): expert weights get the expert-parallel seed of their EP rank.
    # megatron's use_cpu_initialization draws every rank's local experts from the same CPU generator
    # state, so with ep > 1 experts e and e + E/ep would start identical (measured on 0.16.1).
    kwargs["use_cpu_initialization"] = False
    return TransformerConfig(**kwargs)


def build_model(cfg, config, cuda: bool) -> List[torch.nn.Module]:
    """This rank's model chunks, DDP-wrapped (a list even without virtual pipeline stages)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel

    from megatron_moe_spec.core.layer_specs import get_moe_block_spec
    from megatron_moe_spec.run_config import gpt_model_kwargs

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    use_te = config.transformer_impl == "transformer_engine"  # model.transformer_impl, auto resolved
    hybrid_spec = _hybrid_stack_spec(cfg, config, use_te) if cfg.model.is_hybrid else None
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        edges = dict(pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                     post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                     vp_stage=stage)
        if hybrid_spec is not None:
            from megatron.core.models.hybrid.hybrid_model import HybridModel

            from megatron_moe_spec.run_config import hybrid_model_kwargs

            model = HybridModel(config=config, hybrid_stack_spec=hybrid_spec, **edges, **hybrid_model_kwargs(cfg))
        else:
            spec = get_moe_block_spec(config, cfg.specialization, use_transformer_engine=use_te, vp_stage=stage)
            model = GPTModel(config=config, transformer_layer_spec=spec, **edges, **gpt_model_kwargs(cfg))
        if cuda:
            model.cuda(torch.cuda.current_device())
        if config.fp16 or config.bf16:
            # As Megatron-LM: half-precision parameters, inputs cast in, fp32 logits/loss out.
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(config, model)
        chunks.append(model)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.training.precision != "fp32",
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.training.use_distributed_optimizer,
    )
    return [
        # Megatron-LM disables bucketing for all chunks but the first (their grads are reduced
        # by the pipeline schedule's hooks at the end anyway).
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]


def _hybrid_stack_spec(cfg, config, use_te: bool):
    """megatron's HybridStack spec with the losses substituted in (one spec: every model chunk selects
    its own ``|`` segment of the pattern)."""
    from megatron_moe_spec.core.hybrid import get_hybrid_stack_spec

    return get_hybrid_stack_spec(config, cfg.specialization, hybrid_layer_pattern=cfg.model.hybrid_layer_pattern,
                                 use_transformer_engine=use_te)


def build_optimizer(cfg, model_chunks) -> Tuple[object, object]:
    """megatron's optimizer over the chunks and its ``OptimizerParamScheduler`` (in iterations)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_moe_spec.run_config import lr_scheduler_kwargs, optimizer_config_kwargs

    optimizer = get_megatron_optimizer(OptimizerConfig(**optimizer_config_kwargs(cfg)), model_chunks)
    scheduler = OptimizerParamScheduler(optimizer, **lr_scheduler_kwargs(cfg))
    return optimizer, scheduler


def moe_layers(model_chunks):
    """The specialization MoE layers of this rank (for ``begin_step``)."""
    from megatron_moe_spec.core.moe_layer import SpecializationMoELayer

    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, SpecializationMoELayer)]


def unwrap(chunk):
    """The GPTModel / HybridModel inside megatron's DDP (and Float16Module) wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def count_local_parameters(model_chunks) -> int:
    return sum(p.numel() for chunk in model_chunks for p in chunk.parameters())
