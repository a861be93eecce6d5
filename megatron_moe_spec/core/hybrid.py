"""The losses on megatron-core's ``HybridModel`` (0.19+): the hybrid stack spec with our modules in.

    config = TransformerConfig(num_layers=4, ...)       # num_layers = the pattern's layer symbols
    spec = SpecializationConfig(sp_coeff=2e-3, cp_coeff=1e-3)
    stack_spec = get_hybrid_stack_spec(config, spec, hybrid_layer_pattern="*E*E")
    model = HybridModel(config=config, hybrid_stack_spec=stack_spec, hybrid_layer_pattern="*E*E", ...)

A HybridModel is built from a layer pattern: ``*`` attention, ``-`` dense MLP, ``E`` MoE (and ``M``
Mamba, ``G`` gated delta net, ``D`` DeepSeek sparse attention, ``+`` MLA; ``|`` pipeline segments,
``/`` the MTP part). Every ``E`` layer is built from ``HybridStackSubmodules.moe_layer``; that spec gets
our MoE layer (``SpecializationMoELayer``), router (``SpecializationRouter``) and a carry-aware layer
class (:class:`SpecializationMoETransformerLayer`), exactly as ``layer_specs`` does for a GPT block.

**megatron's config for a HybridModel.** ``num_layers`` must be the number of layer symbols of the
main pattern (``|`` and the ``/`` MTP part do not count: ``"*E*E"`` and ``"*E|*E"`` are 4; Megatron-LM
derives it so, ``get_hybrid_total_layer_count``); a layer's ``layer_number`` is its 1-based position in
that pattern, so the tracker's ``coupling_loss/layer_i`` etc. use ``i`` = the 0-based index of the
``E`` layer in the pattern (a GPT layer ``j`` of ``*E`` repeated is hybrid layer ``2j + 1``).
``moe_layer_freq`` is not read by ``HybridStack`` (the pattern places the ``E`` layers) nor by us for
a hybrid pattern: leave it at its default.

**The R_cp carry.** R_cp pairs each ``E`` layer with the next ``E`` layer of the pattern, whatever
lies between. The earlier layer's top-k mass rides on the hidden-state tensor as an attribute (see
``core.transformer_layer``); our ``E`` layers read and write it, and :class:`SpecializationHybridStack`
registers a forward hook on every other layer (attention, dense MLP, any family) that copies the
attribute from the layer's input hidden states to its output. ``HybridStack.forward`` hands each
layer's output (first element of a tuple) straight to the next layer, so nothing else drops it.
No global state: the carry belongs to one micro-batch and one pass.

**Recomputation** under ``HybridStack`` (full uniform, full block, selective ``moe``) is exact: the
same losses and gradients as without (tests/test_hybrid.py::test_recompute_matches_no_recompute; under
PP2 with an R_cp pair across the ``|``: tests/test_hybrid_parity.py);
``recompute_method: block`` with R_cp is refused by ``check_compatibility``, as for GPT.

**On CPU** megatron's ``hybrid_stack_spec`` uses Transformer Engine modules (and ``HybridStack``
builds its final norm with ``TENorm``): :func:`local_hybrid_stack_spec` is the same stack for ``*``,
``-`` and ``E`` from megatron's local modules (those of its local GPT spec).

**Pipeline parallelism.** megatron builds ``|`` segment ``i`` on pipeline rank ``i % pp`` as model
chunk ``i // pp`` (``stage_transport.hybrid_pipeline_segments``; without ``|``, an even split or
``num_layers_in_first/last_pipeline_stage``). Each ``E`` layer gets the pattern, so an R_cp pair whose
``E`` layers lie on different stages or chunks travels through ``core.stage_transport``'s side channel
(``cp_pipeline: exact``), exactly as for a GPTModel. A layout that would leave layers unbuilt (the
number of ``|`` segments is not pp x vpp, or ``|`` with pipeline_model_parallel_size 1) is refused by
:func:`_check_pipeline`.

Not here yet: ``M``/``G`` need their CUDA kernels (:func:`check_hybrid_pattern`); ``D`` (DSA), ``+`` (MLA) and the ``/``
MTP part are refused.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import List, Optional

from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_moe_spec.core import aux_losses, stage_transport
from megatron_moe_spec.core.compatibility import check_compatibility
from megatron_moe_spec.core.layer_specs import (
    _tp_cp_group_or_none,
    cross_stage_pairs,
    enabled_loss_names,
    have_transformer_engine,
    substitute_moe_mlp,
)
from megatron_moe_spec.core.transformer_layer import (
    CARRY_ATTRIBUTE,
    RoutingCarryMixin,
    SpecializationTransformerLayer,
)
from megatron_moe_spec.specialization_config import SpecializationConfig

# Layer symbols of megatron's pattern (megatron.core.models.hybrid.hybrid_layer_allocation.Symbols).
ATTENTION, MLP, MOE, MAMBA, GDN, DSA, MLA = "*", "-", "E", "M", "G", "D", "+"
PIPE, MTP_SEPARATOR = "|", "/"
_SUBMODULE_OF = {ATTENTION: "attention_layer", MLP: "mlp_layer", MOE: "moe_layer", MAMBA: "mamba_layer",
                 GDN: "gdn_layer", DSA: "dsa_layer", MLA: "mla_layer"}

# What the families we cannot run on CPU need: (family, megatron's module, [(python module, pip name)]).
_KERNELS = {
    MAMBA: ("Mamba", "megatron.core.ssm.mamba_mixer.MambaMixer",
            [("mamba_ssm.ops.triton.ssd_combined", "mamba-ssm"), ("causal_conv1d", "causal-conv1d"),
             ("transformer_engine", "transformer-engine")]),
    GDN: ("gated delta net", "megatron.core.ssm.gated_delta_net.GatedDeltaNet",
          [("fla.ops.gated_delta_rule", "flash-linear-attention"), ("transformer_engine", "transformer-engine")]),
}


# ----------------------------------------------------------------------------- the pattern
def _layer_symbols(pattern: str) -> List[str]:
    """The main pattern's layer symbols, in order (``|`` dropped, the ``/`` MTP part cut off)."""
    return [c for c in pattern.split(MTP_SEPARATOR)[0] if c != PIPE]


def hybrid_moe_layer_numbers(pattern: str) -> List[int]:
    """1-based numbers of the ``E`` layers of the whole main pattern (``|`` ignored, the ``/`` MTP part
    left out): their ``layer_number`` in ``HybridStack``. ``"*E-*E"`` -> ``[2, 5]``."""
    return [i + 1 for i, symbol in enumerate(_layer_symbols(pattern)) if symbol == MOE]


def hybrid_layer_count(pattern: str) -> int:
    """The main pattern's layer count: what ``TransformerConfig.num_layers`` must be."""
    return len(_layer_symbols(pattern))


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or a CUDA library that fails to load
        return False
    return True


def check_hybrid_pattern(pattern: str) -> None:
    """Refuse, in one line, what the losses cannot run for this ``hybrid_layer_pattern``.

    ``M``, ``G``: only where their CUDA kernels import (the message names the symbol, the missing module
    and the fix; tests/test_gpu_hybrid.py checks R_cp across them on a GPU); ``D`` (DeepSeek sparse
    attention), ``+`` (MLA) and an MTP part (``/``): refused, no test covers them with the losses yet;
    anything else that is not one of megatron's symbols. ``*``, ``-``, ``E`` and ``|`` always pass.
    """
    if not isinstance(pattern, str) or not _layer_symbols(pattern):
        raise ValueError(f"hybrid_layer_pattern {pattern!r}: expected a non-empty pattern such as '*E*E'")
    if MTP_SEPARATOR in pattern:
        raise ValueError(
            f"hybrid_layer_pattern {pattern!r}: the MTP part ('/...') is refused with the specialization "
            "losses (as mtp_num_layers is); remove it from the pattern")
    for symbol in dict.fromkeys(_layer_symbols(pattern)):
        if symbol in (ATTENTION, MLP, MOE):
            continue
        if symbol == MLA:
            raise ValueError(
                f"hybrid_layer_pattern {pattern!r}: '+' (MLA layer) is not tested with the specialization "
                "losses yet; use '*' attention layers")
        if symbol == DSA:
            raise ValueError(
                f"hybrid_layer_pattern {pattern!r}: 'D' (DeepSeek sparse attention) is refused with the "
                "specialization losses until a GPU test covers it (it needs an MLATransformerConfig); use '*'")
        if symbol not in _KERNELS:
            raise ValueError(
                f"hybrid_layer_pattern {pattern!r}: unknown layer symbol {symbol!r}; megatron's symbols are "
                "* - E M G D + (and | /)")
        family, module, needs = _KERNELS[symbol]
        for python_module, pip_name in needs:
            if not _importable(python_module):
                raise ValueError(
                    f"hybrid_layer_pattern {pattern!r}: '{symbol}' ({family}, {module}) needs {python_module}, "
                    f"which does not import here (CUDA kernels); install {pip_name} on a GPU machine, or "
                    f"remove '{symbol}' from the pattern")


def _check_pattern_against(config, stack_spec: ModuleSpec, pattern: str) -> None:
    count = hybrid_layer_count(pattern)
    if config.num_layers != count:
        raise ValueError(
            f"num_layers is {config.num_layers} but hybrid_layer_pattern {pattern!r} has {count} layers; set "
            f"num_layers to {count} (the pattern's layer symbols, as Megatron-LM derives it)")
    if not hybrid_moe_layer_numbers(pattern):
        raise ValueError(f"hybrid_layer_pattern {pattern!r} has no 'E' (MoE) layer: the specialization losses "
                         "need one; add 'E' layers or turn the losses off")
    from megatron.core.transformer.identity_op import IdentityOp

    for symbol in dict.fromkeys(_layer_symbols(pattern)):
        if getattr(stack_spec.submodules, _SUBMODULE_OF[symbol]) is IdentityOp:
            raise ValueError(
                f"hybrid_layer_pattern {pattern!r}: the stack spec has no module for '{symbol}' "
                f"({_SUBMODULE_OF[symbol]} is IdentityOp, so the layer would do nothing); use a spec that "
                "builds it (megatron's hybrid_stack_spec) or remove the symbol")


def _check_pipeline(config, pattern: str) -> None:
    """Pipeline parallelism with a hybrid pattern: every layer must be built by exactly one model chunk
    (``stage_transport.hybrid_pipeline_segments`` raises, naming the fix, where megatron would leave
    ``|`` segments unbuilt or refuse the layout)."""
    from megatron_moe_spec.core import stage_transport

    stage_transport.hybrid_pipeline_segments(config, pattern)


# ----------------------------------------------------------------------------- the modules
try:  # megatron-core >= 0.19; on older versions this module imports, and every entry point says why not
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.transformer.transformer_layer import MoETransformerLayer

    HAVE_HYBRID = True
except ImportError:
    HAVE_HYBRID = False


def _require_hybrid() -> None:
    """megatron-core's hybrid package (0.19+), or a one-line error naming the version."""
    if not HAVE_HYBRID:
        from megatron_moe_spec.core.version import megatron_core_version

        raise ImportError(
            f"megatron_moe_spec.core.hybrid: HybridModel needs megatron-core >= 0.19 "
            f"(installed: {megatron_core_version()}); upgrade megatron-core or use get_moe_block_spec "
            "with GPTModel")


if HAVE_HYBRID:

    class LocalHybridStack(HybridStack):
        """``HybridStack`` whose final norm is built from the ``final_norm`` spec param (e.g. megatron's
        local ``WrappedTorchNorm``) instead of ``TENorm``, which needs Transformer Engine. With
        ``final_norm=None`` it is ``HybridStack``."""

        def __init__(self, config, submodules, *args, final_norm=None, post_layer_norm: bool = True,
                     **kwargs):
            if final_norm is None:
                super().__init__(config, submodules, *args, post_layer_norm=post_layer_norm, **kwargs)
                return
            super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
            self.post_layer_norm = post_layer_norm
            if self.post_process and self.post_layer_norm:
                self.final_norm = build_module(final_norm, config=self.config, hidden_size=self.config.hidden_size,
                                               eps=self.config.layernorm_epsilon)

    class SpecializationHybridStack(LocalHybridStack):
        """``HybridStack`` that passes R_cp's routing carry across the layers that are not ours (see the
        module docstring): a forward hook on each copies the carry attribute from the input hidden
        states to the output."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._carry_hooks = [layer.register_forward_hook(_pass_carry, with_kwargs=True)
                                 for layer in self.layers if not isinstance(layer, RoutingCarryMixin)]

    class SpecializationMoETransformerLayer(RoutingCarryMixin, MoETransformerLayer):
        """megatron's ``MoETransformerLayer`` (a HybridModel's ``E`` layer) + the routing carry of R_cp."""


def _pass_carry(module, args, kwargs, output):
    """Forward hook: the carry attribute of the input hidden states onto the output hidden states."""
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    carry = getattr(hidden_states, CARRY_ATTRIBUTE, None)
    if carry is not None:
        out = output[0] if isinstance(output, tuple) else output
        setattr(out, CARRY_ATTRIBUTE, carry)
    return None


# ----------------------------------------------------------------------------- the specs
def local_hybrid_stack_spec(config=None) -> ModuleSpec:
    """megatron's hybrid stack for ``*``, ``-`` and ``E`` from its local (non-Transformer-Engine)
    modules: the attention, dense MLP and MoE parts of its local GPT layer spec
    (``get_gpt_layer_local_submodules``), in ``TransformerLayer`` / ``MLPLayer`` /
    ``MoETransformerLayer`` as megatron's ``hybrid_stack_spec`` has them, and a local final norm.

    ``config`` (optional): its ``normalization``, ``qk_layernorm``, ``num_moe_experts`` and
    ``moe_grouped_gemm`` pick the modules as the GPT local spec does; without it the norms are
    ``WrappedTorchNorm`` (LayerNorm or RMSNorm by the model's config at build time).
    """
    _require_hybrid()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    options = {}
    if config is not None:
        options = dict(normalization=config.normalization, qk_layernorm=bool(config.qk_layernorm))
    dense = get_gpt_layer_local_submodules(num_experts=None, **options)
    moe = get_gpt_layer_local_submodules(
        num_experts=(config.num_moe_experts if config is not None and config.num_moe_experts else 8),
        moe_grouped_gemm=bool(config.moe_grouped_gemm) if config is not None else False, **options)
    norm = dense.input_layernorm if config is not None else WrappedTorchNorm
    keys = dense.sharded_state_dict_keys_map or {}

    def keys_of(prefix):
        return {k: v for k, v in keys.items() if k.startswith(prefix)}

    return ModuleSpec(
        module=LocalHybridStack,
        params={"final_norm": norm},
        submodules=HybridStackSubmodules(
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=norm, self_attention=dense.self_attention, self_attn_bda=dense.self_attn_bda,
                    sharded_state_dict_keys_map=keys_of("input_layernorm."))),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=norm, mlp=dense.mlp, mlp_bda=dense.mlp_bda,
                    sharded_state_dict_keys_map=keys_of("pre_mlp_layernorm."))),
            moe_layer=ModuleSpec(
                module=MoETransformerLayer,
                submodules=TransformerLayerSubmodules(pre_mlp_layernorm=norm, mlp=moe.mlp, mlp_bda=moe.mlp_bda)),
        ),
    )


def get_hybrid_stack_spec(config, spec_config: Optional[SpecializationConfig] = None,
                          hybrid_layer_pattern: Optional[str] = None,
                          use_transformer_engine: Optional[bool] = None,
                          base_spec: Optional[ModuleSpec] = None) -> ModuleSpec:
    """The hybrid stack spec for ``HybridModel(hybrid_stack_spec=...)`` with the losses substituted in.

    The base is ``base_spec``, else megatron's ``hybrid_stack_spec`` when Transformer Engine is used
    (``use_transformer_engine``, default: installed), else :func:`local_hybrid_stack_spec`. With
    ``spec_config`` off (every coefficient 0, metrics off) the base comes back unchanged (the same
    object). ``hybrid_layer_pattern``: the HybridModel's pattern (required when anything is on).
    """
    if base_spec is None:
        if use_transformer_engine is None:
            use_transformer_engine = have_transformer_engine()
        if use_transformer_engine:
            _require_hybrid()
            from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as base_spec
        else:
            base_spec = local_hybrid_stack_spec(config)
    return specialize_hybrid_stack_spec(base_spec, config, spec_config, hybrid_layer_pattern)


def specialize_hybrid_stack_spec(stack_spec: ModuleSpec, config,
                                 spec_config: Optional[SpecializationConfig] = None,
                                 hybrid_layer_pattern: Optional[str] = None) -> ModuleSpec:
    """Substitute the losses into a built hybrid stack spec (megatron's, Megatron-LM's ``--spec``, or
    :func:`local_hybrid_stack_spec`).

    Off: ``stack_spec`` unchanged. On: checks the pattern (:func:`check_hybrid_pattern`, ``num_layers``,
    a module for every symbol), refuses a pipeline layout that leaves layers unbuilt and what
    ``check_compatibility`` refuses, substitutes ``moe_layer`` (our MoE layer, router and carry-aware
    layer class) and the stack class (:class:`SpecializationHybridStack`, which passes the carry across
    the other layers), and registers the enabled loss names in megatron's tracker.
    """
    spec_config = spec_config if spec_config is not None else SpecializationConfig()
    if not spec_config.enabled:
        return stack_spec
    _require_hybrid()
    if hybrid_layer_pattern is None:
        raise ValueError(
            "specialize_hybrid_stack_spec: hybrid_layer_pattern is required with the specialization losses "
            "on; pass the HybridModel's pattern (e.g. '*E*E')")
    check_hybrid_pattern(hybrid_layer_pattern)
    _check_pattern_against(config, stack_spec, hybrid_layer_pattern)
    _check_pipeline(config, hybrid_layer_pattern)
    check_compatibility(config, spec_config, hybrid_layer_pattern=hybrid_layer_pattern)

    stack_class = stack_spec.module
    if stack_class in (HybridStack, LocalHybridStack):
        stack_class = SpecializationHybridStack
    elif not (isinstance(stack_class, type) and issubclass(stack_class, SpecializationHybridStack)):
        raise TypeError(
            f"specialize_hybrid_stack_spec: expected a HybridStack spec, got {stack_class}; build it from "
            "megatron's hybrid_stack_spec or local_hybrid_stack_spec")
    submodules = stack_spec.submodules
    moe_layer = _substitute_moe_layer(submodules.moe_layer, spec_config, hybrid_layer_pattern)
    if spec_config.cp_coeff > 0 and spec_config.cp_pipeline == "exact" and cross_stage_pairs(
            config, hybrid_moe_layer_numbers(hybrid_layer_pattern), hybrid_layer_pattern):
        stage_transport.ensure_side_groups()  # a collective: every rank builds its spec
    aux_losses.register_loss_names(enabled_loss_names(spec_config),
                                   config.num_layers + (config.mtp_num_layers or 0),
                                   reduce_group=_tp_cp_group_or_none())
    return dataclasses.replace(stack_spec, module=stack_class,
                               submodules=dataclasses.replace(submodules, moe_layer=moe_layer))


def _substitute_moe_layer(layer_spec, spec_config, hybrid_layer_pattern: str) -> ModuleSpec:
    if not isinstance(layer_spec, ModuleSpec) or layer_spec.module not in (MoETransformerLayer, TransformerLayer):
        raise TypeError(
            f"hybrid stack spec: moe_layer must be a MoETransformerLayer (or TransformerLayer) spec, got "
            f"{getattr(layer_spec, 'module', layer_spec)}")
    submodules, found = substitute_moe_mlp(layer_spec.submodules, spec_config, hybrid_layer_pattern)
    if not found:
        raise TypeError(
            "hybrid stack spec: moe_layer's mlp is not megatron's MoELayer; the specialization losses need "
            "MoELayer (megatron's get_moe_module_spec)")
    layer_class = (SpecializationMoETransformerLayer if layer_spec.module is MoETransformerLayer
                   else SpecializationTransformerLayer)
    return dataclasses.replace(layer_spec, module=layer_class, submodules=submodules)
