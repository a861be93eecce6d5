"""Layer specs with the specialization losses wired in, by ``ModuleSpec`` substitution.

    config = TransformerConfig(...)                 # the user's megatron-core config
    spec = SpecializationConfig(sp_coeff=2e-3, cp_coeff=1e-3)
    block_spec = get_moe_block_spec(config, spec)   # or deepseek_moe_block_spec / vanilla_moe_block_spec
    model = GPTModel(config=config, transformer_layer_spec=block_spec, ...)

megatron-core's own block spec is built first (Transformer Engine modules when TE is installed,
local modules otherwise) and then three modules are substituted: ``TransformerLayer`` ->
``SpecializationTransformerLayer``, ``MoELayer`` -> ``SpecializationMoELayer`` and the router ->
``SpecializationRouter``. With everything off (all coefficients 0, metrics off) megatron's spec is
returned unchanged: off means stock megatron-core, bit for bit and at no cost.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import List, Optional

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_moe_spec.core import aux_losses, stage_transport
from megatron_moe_spec.core.compatibility import check_compatibility  # noqa: F401  (the rule lives there)
from megatron_moe_spec.core.moe_layer import SpecializationMoELayer
from megatron_moe_spec.core.router import SpecializationRouter
from megatron_moe_spec.core.transformer_layer import SpecializationTransformerLayer
from megatron_moe_spec.specialization_config import SpecializationConfig

logger = logging.getLogger(__name__)


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install
        return False
    return True


def get_moe_block_spec(config, spec_config: Optional[SpecializationConfig] = None,
                       use_transformer_engine: Optional[bool] = None,
                       vp_stage: Optional[int] = None, pp_rank: Optional[int] = None
                       ) -> TransformerBlockSubmodules:
    """megatron's GPT decoder-block spec for ``config`` with the specialization losses substituted in.

    Works for vanilla top-k MoE and DeepSeekMoE-style models alike: shared experts, fine-grained
    experts, group-limited routing, sigmoid scores and expert bias are all ``TransformerConfig``
    options that megatron's own modules implement; the substituted modules only add the losses.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec_config = spec_config if spec_config is not None else SpecializationConfig()
    check_compatibility(config, spec_config)
    if use_transformer_engine is None:
        use_transformer_engine = have_transformer_engine()
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine,
                                       vp_stage=vp_stage, pp_rank=pp_rank)
    return specialize_block_spec(block, config, spec_config, checked=True)


def specialize_block_spec(block: TransformerBlockSubmodules, config,
                          spec_config: Optional[SpecializationConfig] = None,
                          checked: bool = False) -> TransformerBlockSubmodules:
    """Substitute the losses into an already built decoder-block spec (e.g. Megatron-LM's own).

    Returns ``block`` unchanged when ``spec_config`` is off. Otherwise checks the combination
    (unless ``checked``), substitutes every layer spec and registers the enabled loss names in
    megatron's tracker on this rank (see ``aux_losses.register_loss_names``).
    """
    spec_config = spec_config if spec_config is not None else SpecializationConfig()
    if not spec_config.enabled:
        return block
    if not checked:
        check_compatibility(config, spec_config)
    layer_specs = [substitute_layer_spec(s, spec_config) for s in block.layer_specs]
    if spec_config.cp_coeff > 0 and spec_config.cp_pipeline == "exact" and \
            cross_stage_pairs(config, moe_layer_numbers(config)):
        stage_transport.ensure_side_groups()  # a collective: every rank builds its spec
    aux_losses.register_loss_names(enabled_loss_names(spec_config),
                                   config.num_layers + (config.mtp_num_layers or 0),
                                   reduce_group=_tp_cp_group_or_none())
    return dataclasses.replace(block, layer_specs=layer_specs)


def vanilla_moe_block_spec(config, spec_config=None, **kwargs) -> TransformerBlockSubmodules:
    """Block spec for a vanilla top-k MoE (no shared experts)."""
    if config.moe_shared_expert_intermediate_size is not None:
        raise ValueError(
            "vanilla_moe_block_spec: the config has shared experts "
            "(moe_shared_expert_intermediate_size); use deepseek_moe_block_spec for DeepSeekMoE-style models"
        )
    return get_moe_block_spec(config, spec_config, **kwargs)


def deepseek_moe_block_spec(config, spec_config=None, **kwargs) -> TransformerBlockSubmodules:
    """Block spec for a DeepSeekMoE-style model: fine-grained routed experts + shared experts.

    Shared experts are never part of R_sp / L_o (they process every token: only routed experts are
    captured). Group-limited routing (moe_router_num_groups / moe_router_group_topk), sigmoid scores
    and expert bias come from the config.
    """
    if config.moe_shared_expert_intermediate_size is None:
        raise ValueError(
            "deepseek_moe_block_spec: set moe_shared_expert_intermediate_size (the shared experts' "
            "total FFN size); without shared experts use vanilla_moe_block_spec"
        )
    return get_moe_block_spec(config, spec_config, **kwargs)


def substitute_layer_spec(layer_spec: ModuleSpec, spec_config: SpecializationConfig) -> ModuleSpec:
    """One layer spec with our TransformerLayer (always) and MoE layer / router (MoE layers)."""
    if layer_spec.module is not TransformerLayer:
        raise TypeError(f"expected a TransformerLayer spec, got {layer_spec.module}")
    submodules, _ = substitute_moe_mlp(layer_spec.submodules, spec_config)
    return dataclasses.replace(layer_spec, module=SpecializationTransformerLayer, submodules=submodules)


def substitute_moe_mlp(submodules, spec_config: SpecializationConfig, hybrid_layer_pattern: Optional[str] = None):
    """``(submodules, found)``: a layer's ``TransformerLayerSubmodules`` with megatron's ``MoELayer``
    (a ``ModuleSpec``, or from 0.18 a ``functools.partial``) replaced by ``SpecializationMoELayer`` with
    ``SpecializationRouter``; ``found`` says whether the mlp was an ``MoELayer`` (else unchanged).
    ``hybrid_layer_pattern``: a HybridModel's pattern, handed to the MoE layer (its R_cp pairs and
    their pipeline stages follow the pattern)."""
    extra = {"spec_config": spec_config}
    if hybrid_layer_pattern is not None:
        extra["hybrid_layer_pattern"] = hybrid_layer_pattern
    mlp = submodules.mlp
    if isinstance(mlp, ModuleSpec) and mlp.module is MoELayer:
        moe_submodules: MoESubmodules = mlp.submodules
        mlp = ModuleSpec(
            module=SpecializationMoELayer,
            submodules=dataclasses.replace(moe_submodules, router=SpecializationRouter),
            params={**(mlp.params or {}), **extra},
        )
    elif isinstance(mlp, functools.partial) and mlp.func is MoELayer:
        # megatron-core >= 0.19 specs the MoE layer as functools.partial(MoELayer, submodules=...).
        keywords = dict(mlp.keywords)
        keywords["submodules"] = dataclasses.replace(keywords["submodules"], router=SpecializationRouter)
        mlp = functools.partial(SpecializationMoELayer, *mlp.args, **extra, **keywords)
    else:
        return submodules, False
    return dataclasses.replace(submodules, mlp=mlp), True


def enabled_loss_names(spec_config: SpecializationConfig) -> List[str]:
    pairs = [(aux_losses.SPECIALIZATION_LOSS, spec_config.sp_coeff),
             (aux_losses.COUPLING_LOSS, spec_config.cp_coeff),
             (aux_losses.ORTHOGONALITY_LOSS, spec_config.ortho_coeff),
             (aux_losses.VARIANCE_LOSS, spec_config.var_coeff)]
    return [name for name, coeff in pairs if coeff > 0]


def moe_layer_numbers(config, hybrid_layer_pattern: Optional[str] = None) -> List[int]:
    """1-based numbers of the MoE layers of the whole model: megatron's moe_layer_freq rule (GPTModel),
    or the ``E`` layers of ``hybrid_layer_pattern`` (HybridModel; ``core.hybrid.hybrid_moe_layer_numbers``)."""
    if hybrid_layer_pattern is not None:
        from megatron_moe_spec.core.hybrid import hybrid_moe_layer_numbers

        return hybrid_moe_layer_numbers(hybrid_layer_pattern)
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        pattern = [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    else:
        pattern = list(freq)
    return [i + 1 for i, is_moe in enumerate(pattern) if is_moe]


def cross_stage_pairs(config, moe_layers: List[int], hybrid_layer_pattern: Optional[str] = None) -> List[tuple]:
    """Adjacent MoE layer pairs (l, l') that live on different pipeline stages / model chunks.

    ``hybrid_layer_pattern``: a HybridModel's pattern, whose ``|`` segments place the layers
    (stage_transport.pipeline_owner); None for a GPTModel."""
    pp = config.pipeline_model_parallel_size or 1
    vpp = config.virtual_pipeline_model_parallel_size or 1
    if pp == 1 and vpp == 1:
        return []
    owner = functools.partial(stage_transport.pipeline_owner, config, hybrid_layer_pattern=hybrid_layer_pattern)
    return [(a, b) for a, b in zip(moe_layers[:-1], moe_layers[1:]) if owner(a) != owner(b)]


def coupled_layers(config, cp_pipeline: str = "exact", hybrid_layer_pattern: Optional[str] = None) -> List[int]:
    """The 0-based layers that carry an R_cp value (the tracker's ``coupling_loss/layer_i``): the first
    layer of each adjacent MoE pair, less the pairs across pipeline stages under ``cp_pipeline: skip``.
    HybridModel: pass its ``hybrid_layer_pattern`` (the indices are the ``E`` layers' positions in it;
    its ``|`` segments place them on the stages)."""
    numbers = moe_layer_numbers(config, hybrid_layer_pattern)
    split = ({a for a, _ in cross_stage_pairs(config, numbers, hybrid_layer_pattern)}
             if cp_pipeline == "skip" else set())
    return [n - 1 for n in numbers[:-1] if n not in split]


_WARNED_PAIRS = set()


def warn_cross_stage_pairs(config, moe_layers: List[int], hybrid_layer_pattern: Optional[str] = None) -> None:
    """``cp_pipeline: skip``: name the pairs left out, once per process, with the 0-based layer
    indices of the logs (``coupling_loss/layer_i``). ``hybrid_layer_pattern``: as in
    :func:`cross_stage_pairs`."""
    pairs = tuple(cross_stage_pairs(config, moe_layers, hybrid_layer_pattern))
    if pairs and pairs not in _WARNED_PAIRS:
        _WARNED_PAIRS.add(pairs)
        names = ", ".join(f"({a - 1}, {b - 1})" for a, b in pairs)
        logger.warning(
            "R_cp with cp_pipeline: skip: the adjacent MoE layer pairs %s (0-based layer indices, as in "
            "the logs) live on different pipeline stages or model chunks and are left out of R_cp; "
            "cp_pipeline: exact computes them",
            names,
        )


def _tp_cp_group_or_none():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_and_context_parallel_group()
