"""Megatron-LM integration: the hooks that the patches in ``patches/`` call from ``pretrain_gpt.py``.

Megatron-LM's training package (``megatron.training``, ``pretrain_gpt.py``) is not part of the
megatron-core wheel. This module imports it only inside functions, so it imports without
Megatron-LM (and without megatron-core: the adapter in ``megatron_moe_spec.core`` is imported
lazily too). docs/megatron_lm.md has the user-facing instructions.

The hooks, in the order a patched ``pretrain_gpt.py`` run meets them:

``chain_extra_args_provider(existing)`` / ``add_specialization_args(parser)``
    the ``--moe-spec-*`` flags (``extra_args_provider`` of ``pretrain`` / ``parse_and_validate_args``).
``specialize_layer_spec(spec, config, vp_stage)``
    called by the patched model builder on the layer spec it is about to use: resolves a callable
    given with ``--spec`` and, when any ``--moe-spec-*`` loss or the metrics are on, substitutes
    the specialization modules into Megatron-LM's own decoder-block spec. Off = unchanged.
``gpt_layer_spec(config, vp_stage)``
    the ``--spec megatron_moe_spec.megatron_lm gpt_layer_spec`` entry point (a callable: Megatron-LM
    core_v0.19.0's ``GPTModelBuilder`` calls it with the model config; on core_v0.16.1 the patched
    ``gpt_builder`` does, through ``specialize_layer_spec``).
``specialize_hybrid_stack_spec(spec, config, vp_stage)``
    the same for ``pretrain_hybrid.py`` (megatron-core's HybridModel): called by the patched hybrid
    builder on the HybridStack spec it chose (``--spec``, or upstream's default); substitutes the
    losses into its ``moe_layer`` (``core.hybrid.specialize_hybrid_stack_spec``) for the run's
    ``--hybrid-layer-pattern``. Off: unchanged. megatron-core >= 0.19 only.
``register_model(model)``
    after the model chunk is built: checks the substitution happened, remembers the MoE layers
    (for ``metrics_interval``).
``track_names(args, names)``
    megatron's tracker names plus the enabled specialization losses, for ``training_log``.
``report_coupling_as_pair_mean(args)``
    in ``training_log`` before megatron's tracker report: makes the reported ``coupling_loss`` the
    mean over the adjacent MoE layer pairs that exist (megatron divides by the number of MoE layers).
``log_specialization_metrics(iteration, writer, wandb_writer)``
    the routing metrics hook in ``training_log`` (a collective: every rank calls it).
"""
from __future__ import annotations

import argparse
import os
import re
import types
import weakref
from dataclasses import dataclass, fields
from typing import Callable, List, Optional, Tuple

from megatron_moe_spec.specialization_config import (
    CP_FORMS,
    CP_PIPELINE_POLICIES,
    SP_SIMILARITIES,
    V_FORMS,
    SpecializationConfig,
)

SPEC_MODULE = "megatron_moe_spec.megatron_lm"
SPEC_FUNCTION = "gpt_layer_spec"
"""``--spec megatron_moe_spec.megatron_lm gpt_layer_spec``."""

FLAG_PREFIX = "--moe-spec-"
DEST_PREFIX = "moe_spec_"

# field -> (type, help). Flags are --moe-spec-<field with - for _>, dest moe_spec_<field>.
# Every default is None: "not given", so --moe-spec-config (then SpecializationConfig's own
# default) decides. The effective defaults are SpecializationConfig's: everything off.
_FLAGS = {
    "sp_coeff": (float, "lambda_sp of R_sp, the intra-layer specialization loss (paper: 2e-3). "
                        "Default 0 (off)."),
    "cp_coeff": (float, "lambda_cp of R_cp, the cross-layer coupling loss (paper: 1e-3). Default 0 (off)."),
    "ortho_coeff": (float, "lambda_o of L_o, the orthogonality loss of arXiv 2505.22323. Default 0 (off)."),
    "var_coeff": (float, "lambda_v of L_v, the router variance loss of arXiv 2505.22323. Default 0 (off)."),
    "sp_similarity": (SP_SIMILARITIES, "R_sp pair similarity. Default squared_cosine."),
    "sp_max_tokens": (int, "Evaluate R_sp and L_o on at most this many valid tokens per micro-batch "
                           "(evenly strided by global position, the offset rotating with the iteration: "
                           "the same tokens in every layout; under EP alltoall only their rows travel). "
                           "Default: all tokens."),
    "cp_form": (CP_FORMS, "R_cp form: product = -mean M M', log = -mean log(M M' + 1e-9). Default product."),
    "cp_pipeline": (CP_PIPELINE_POLICIES, "Adjacent MoE layers on different pipeline stages "
                                          "(see docs/configuration.md). Default exact."),
    "v_form": (V_FORMS, "L_v form. Default paper."),
    "eps": (float, "eps of the cosine / projection denominators. Default 1e-6."),
    "metrics": (bool, "Compute and log the routing metrics (no gradient). Default off."),
    "metrics_interval": (int, "Compute (and log) the routing metrics every this many iterations. Default 1."),
}


def flag_name(field: str) -> str:
    """``sp_coeff`` -> ``--moe-spec-sp-coeff``."""
    return FLAG_PREFIX + field.replace("_", "-")


def dest_name(field: str) -> str:
    """``sp_coeff`` -> ``moe_spec_sp_coeff`` (the attribute on Megatron-LM's ``args``)."""
    return DEST_PREFIX + field


# ---------------------------------------------------------------------------------------- args
def add_specialization_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``extra_args_provider``: add the ``--moe-spec-*`` flags to Megatron-LM's parser."""
    group = parser.add_argument_group(
        title="megatron-moe-spec",
        description="Expert-specialization losses (R_sp, R_cp, L_o, L_v) and routing metrics. "
                    "All off by default; any non-zero coefficient or --moe-spec-metrics switches "
                    "the specialization layer spec on. CLI flags override --moe-spec-config.",
    )
    group.add_argument("--moe-spec-config", dest="moe_spec_config", type=str, default=None,
                       metavar="YAML",
                       help="A YAML file with a 'specialization:' block (the block of "
                            "megatron-moe-spec's own run configs; include: is resolved, other "
                            "sections are ignored). --moe-spec-* flags override its keys.")
    for field, (kind, help_text) in _FLAGS.items():
        name, dest = flag_name(field), dest_name(field)
        if kind is bool:
            group.add_argument(name, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif isinstance(kind, tuple):
            group.add_argument(name, dest=dest, choices=list(kind), default=None, help=help_text)
        else:
            group.add_argument(name, dest=dest, type=kind, default=None, help=help_text)
    return parser


def chain_extra_args_provider(existing: Optional[Callable] = None) -> Callable:
    """An ``extra_args_provider`` running ``existing`` (if any) and then ours."""
    def provider(parser):
        if existing is not None:
            parser = existing(parser)
        return add_specialization_args(parser)

    return provider


def specialization_config_from_args(args) -> SpecializationConfig:
    """The ``SpecializationConfig`` of a run: the ``--moe-spec-config`` block, then the flags.

    ``args`` is Megatron-LM's args namespace. With ``--yaml-cfg`` (which replaces argparse by the
    YAML file), the YAML may carry a ``specialization:`` mapping and/or ``moe_spec_*`` keys; they
    are read the same way. A missing attribute means "not given". Errors are ``ValueError`` naming
    the flag (or the YAML file and key) at fault.
    """
    values = {}
    origin = {}
    config_path = getattr(args, "moe_spec_config", None)
    if config_path:
        for key, value in _read_block(config_path).items():
            values[key] = value
            origin[key] = f"{config_path}: specialization.{key}"
    inline = getattr(args, "specialization", None)  # --yaml-cfg: the block inside that YAML
    if inline is not None:
        where = getattr(args, "yaml_cfg", None) or "args"
        for key, value in _as_dict(inline, where).items():
            values[key] = value
            origin[key] = f"{where}: specialization.{key}"
    for field in _FLAGS:
        value = getattr(args, dest_name(field), None)
        if value is not None:
            values[field] = value
            origin[field] = flag_name(field)
    known = {f.name for f in fields(SpecializationConfig)}
    for key in sorted(set(values) - known):
        raise ValueError(f"{origin[key]}: unknown key {key!r}; known keys are: {', '.join(sorted(known))}")
    try:
        return SpecializationConfig.from_dict(values)
    except ValueError as e:
        match = re.search(r"specialization\.(\w+)", str(e))
        field = match.group(1) if match else None
        if field in origin:
            raise ValueError(f"{origin[field]}: {e}") from None
        raise


def _read_block(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"--moe-spec-config: file not found: {path}")
    from megatron_moe_spec.run_config import ConfigError, load_yaml_file

    try:
        data = load_yaml_file(path)
    except ConfigError as e:
        raise ValueError(f"--moe-spec-config: {e}") from None
    return _as_dict(data.get("specialization") or {}, path)


def _as_dict(block, where: str) -> dict:
    if isinstance(block, (argparse.Namespace, types.SimpleNamespace)):  # --yaml-cfg: nested mappings
        block = dict(vars(block))
    if not isinstance(block, dict):
        raise ValueError(f"{where}: specialization must be a mapping, got {type(block).__name__}")
    return block


# ------------------------------------------------------------------------------ run-time state
class _State:
    def __init__(self):
        self.args_id: Optional[int] = None  # the args object spec_config was read from
        self.spec_config: Optional[SpecializationConfig] = None
        self.layers: List[weakref.ref] = []
        self.coupling: Optional[CouplingSlots] = None  # R_cp's tracker layout, set when the spec is built


_STATE = _State()


def _megatron_args():
    """Megatron-LM's global args, or None when they are not set (e.g. a unit test, a tool)."""
    try:
        from megatron.training.global_vars import get_args

        return get_args()
    except (ImportError, AssertionError, AttributeError):
        return None


def _spec_config(args=None) -> SpecializationConfig:
    """The run's config, read once per args object (the YAML is not re-read every iteration)."""
    args = args if args is not None else _megatron_args()
    if args is None:
        return SpecializationConfig()
    if _STATE.spec_config is None or _STATE.args_id != id(args):
        _STATE.spec_config = specialization_config_from_args(args)
        _STATE.args_id = id(args)
    return _STATE.spec_config


def reset_state() -> None:
    """Forget the cached config and the registered layers (tests; a second run in one process)."""
    _STATE.args_id = None
    _STATE.spec_config = None
    _STATE.layers = []
    _STATE.coupling = None


# ------------------------------------------------------------------------------ the layer spec
def _is_spec_object(spec) -> bool:
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    return isinstance(spec, (ModuleSpec, TransformerBlockSubmodules))


def _transformer_config(config):
    """A ``TransformerConfig`` from a TransformerConfig or an upstream ``GPTModelConfig``."""
    return getattr(config, "transformer", config)


def _is_specialized(spec) -> bool:
    from megatron_moe_spec.core.transformer_layer import SpecializationTransformerLayer

    specs = getattr(spec, "layer_specs", None)
    if specs is None:
        specs = [spec]
    return any(getattr(s, "module", None) is SpecializationTransformerLayer for s in specs)


def _call_spec_callable(spec, config, vp_stage):
    import inspect

    if "vp_stage" in inspect.signature(spec).parameters:
        return spec(config, vp_stage=vp_stage)
    return spec(config)


def specialize_layer_spec(spec, config, vp_stage: Optional[int] = None):
    """The patch hook in the model builder: the layer spec to build ``config``'s decoder with.

    ``spec`` is what Megatron-LM chose (its own MoE block spec, or what ``--spec`` named). A
    callable (``--spec module function`` naming a function) is called with ``(config, vp_stage)``
    first, as upstream Megatron-LM does. Then, when the specialization config is on, the
    specialization modules are substituted into the spec (once). Off: ``spec`` comes back as is.
    """
    if spec is not None and callable(spec) and not _is_spec_object(spec):
        spec = _call_spec_callable(spec, config, vp_stage)
    spec_config = _spec_config()
    if not spec_config.enabled or _is_specialized(spec):
        return spec
    return _specialize(spec, _transformer_config(config), spec_config)


def gpt_layer_spec(config, vp_stage: Optional[int] = None):
    """``--spec megatron_moe_spec.megatron_lm gpt_layer_spec``: Megatron-LM's decoder-block spec
    for ``config`` (a ``TransformerConfig`` or upstream's ``GPTModelConfig``) with the
    specialization modules substituted in when the ``--moe-spec-*`` config is on.
    """
    transformer = _transformer_config(config)
    block = _stock_block_spec(config, vp_stage)
    return _specialize(block, transformer, _spec_config())


def _stock_block_spec(config, vp_stage):
    if hasattr(config, "transformer"):  # upstream GPTModelConfig (core_v0.19.0 and later)
        from megatron.training.models.gpt import default_layer_spec

        return default_layer_spec(config, vp_stage)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if config.num_moe_experts is None:
        raise ValueError(f"--spec {SPEC_MODULE} {SPEC_FUNCTION} builds an MoE block spec: set --num-experts")
    # What core_v0.16.1's gpt_builder passes for an MoE model.
    return get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=config.transformer_impl == "transformer_engine",
        normalization=config.normalization,
        qk_l2_norm=config.qk_l2_norm,
        vp_stage=vp_stage,
    )


def _specialize(spec, transformer_config, spec_config: SpecializationConfig):
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron_moe_spec.core import layer_metrics, layer_specs

    if not spec_config.enabled:
        return spec
    if isinstance(spec, TransformerBlockSubmodules):
        out = layer_specs.specialize_block_spec(spec, transformer_config, spec_config)
    elif isinstance(spec, ModuleSpec):
        # A single layer spec used for every layer: wrap it as a one-entry block to reuse the checks.
        block = TransformerBlockSubmodules(layer_specs=[spec])
        out = layer_specs.specialize_block_spec(block, transformer_config, spec_config).layer_specs[0]
    else:
        raise TypeError(
            f"megatron-moe-spec: cannot substitute the specialization modules into a layer spec of "
            f"type {type(spec).__name__}; use the default MoE spec or --spec {SPEC_MODULE} {SPEC_FUNCTION}"
        )
    if spec_config.cp_coeff > 0:
        _STATE.coupling = coupling_slots(transformer_config, spec_config.cp_pipeline)
    if spec_config.metrics:
        # Every rank registers every MoE layer of the whole model: report() is one all-reduce of
        # same-shaped statistics. Idempotent (one call per model chunk).
        layer_metrics.register_layers(layer_specs.moe_layer_numbers(transformer_config),
                                      transformer_config.num_moe_experts, eps=spec_config.eps)
    return out


# ---------------------------------------------------------------------- the hybrid stack spec
HYBRID_MIN_CORE = (0, 19)
"""HybridModel with the losses: the megatron-core versions it is tested on (core.hybrid, 0.19.2)."""


def _hybrid_pattern(config) -> Optional[str]:
    """The run's hybrid layer pattern: upstream's ``HybridModelConfig.hybrid_layer_pattern`` (core_v0.19.0
    and later), else Megatron-LM's ``--hybrid-layer-pattern`` (core_v0.18.x passes a TransformerConfig)."""
    pattern = getattr(config, "hybrid_layer_pattern", None)
    if pattern is None:
        pattern = getattr(_megatron_args(), "hybrid_layer_pattern", None)
    return pattern


def specialize_hybrid_stack_spec(spec, config, vp_stage: Optional[int] = None):
    """The patch hook in Megatron-LM's hybrid model builder: the HybridStack spec to build with.

    ``spec`` is what Megatron-LM chose (``--spec``, or upstream's default ``hybrid_stack_spec``);
    ``config`` a ``TransformerConfig`` or upstream's ``HybridModelConfig``. When the ``--moe-spec-*``
    config is on, our MoE layer, router and layer classes are substituted into its ``moe_layer``
    (``core.hybrid.specialize_hybrid_stack_spec``, which refuses what the losses cannot serve), for
    the E layers of ``--hybrid-layer-pattern``. Off: ``spec`` comes back as is. One spec serves every
    model chunk (each builds its ``|`` segment), so a second call returns it unchanged.
    """
    if spec is not None and callable(spec) and not _is_spec_object(spec):
        spec = _call_hybrid_spec_callable(spec, config, vp_stage)
    spec_config = _spec_config()
    if not spec_config.enabled or _is_specialized_hybrid(spec):
        return spec
    from megatron_moe_spec.core.version import megatron_core_version

    version = megatron_core_version()
    if (version.major, version.minor) < HYBRID_MIN_CORE:
        raise RuntimeError(
            f"megatron-moe-spec: --moe-spec-* on a HybridModel needs megatron-core >= 0.19 (the version the "
            f"hybrid substitution is tested on); this Megatron-LM imports megatron-core {version}. Use "
            f"Megatron-LM core_v0.19.0 or later, or pretrain_gpt.py (the GPTModel twin of the pattern), or "
            f"drop the --moe-spec-* flags")
    pattern = _hybrid_pattern(config)
    if not pattern:
        raise ValueError("megatron-moe-spec: --moe-spec-* on a HybridModel needs --hybrid-layer-pattern "
                         "(the E symbols say which layers are MoE)")
    if "/" in pattern:
        raise ValueError(f"megatron-moe-spec: --hybrid-layer-pattern {pattern!r} has multi-token prediction "
                         f"layers ('/'), which the specialization losses do not cover; remove the '/...' part "
                         f"or drop the --moe-spec-* flags")
    transformer = _transformer_config(config)
    from megatron_moe_spec.core import hybrid, layer_metrics

    out = hybrid.specialize_hybrid_stack_spec(spec, transformer, spec_config, hybrid_layer_pattern=pattern)
    if spec_config.cp_coeff > 0:
        _STATE.coupling = hybrid_coupling_slots(transformer, pattern, spec_config.cp_pipeline)
    if spec_config.metrics:
        # Every rank registers every MoE layer of the whole model, as for GPT (report() is one all-reduce).
        layer_metrics.register_layers(hybrid.hybrid_moe_layer_numbers(pattern), transformer.num_moe_experts,
                                      eps=spec_config.eps)
    return out


def _call_hybrid_spec_callable(spec, config, vp_stage):
    """``--spec module function`` naming a function: Megatron-LM's hybrid builders use the attribute
    itself as the stack spec; we call it: with ``(config, vp_stage)``, ``(config)`` or ``()``, as its
    signature takes them (e.g. ``core.hybrid.local_hybrid_stack_spec(config)``)."""
    import inspect

    params = [p for p in inspect.signature(spec).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        return spec()
    if "vp_stage" in inspect.signature(spec).parameters:
        return spec(config, vp_stage=vp_stage)
    return spec(config)


def hybrid_stack_spec(config, vp_stage: Optional[int] = None):
    """``--spec megatron_moe_spec.megatron_lm hybrid_stack_spec`` (pretrain_hybrid.py): megatron's HybridStack
    spec for ``config`` (Transformer Engine modules with ``--transformer-impl transformer_engine``, else the
    local ones of ``core.hybrid.local_hybrid_stack_spec``, which run on CPU). The patched builder passes
    it to ``specialize_hybrid_stack_spec``, which calls it and substitutes the losses when the
    ``--moe-spec-*`` config is on."""
    from megatron_moe_spec.core import hybrid

    transformer = _transformer_config(config)
    use_te = getattr(transformer, "transformer_impl", "transformer_engine") == "transformer_engine"
    # The stock spec (everything off: megatron's spec unchanged); the hook substitutes the losses.
    return hybrid.get_hybrid_stack_spec(transformer, None, hybrid_layer_pattern=_hybrid_pattern(config),
                                        use_transformer_engine=use_te)


def _is_specialized_hybrid(spec) -> bool:
    """The stack spec already carries our substitution (``core.hybrid`` makes its stack class
    ``SpecializationHybridStack``)."""
    from megatron_moe_spec.core import hybrid

    module = getattr(spec, "module", None)
    return (hybrid.HAVE_HYBRID and isinstance(module, type)
            and issubclass(module, hybrid.SpecializationHybridStack))


def hybrid_coupling_slots(config, pattern: str, cp_pipeline: str = "skip") -> "CouplingSlots":
    """``CouplingSlots`` of a hybrid layer pattern: the E layers are the MoE layers (0-based tracker slots:
    the position in the pattern, ``|`` excluded); each E pairs with the next E; under ``skip`` a pair split
    across pipeline stages / model chunks (``config``'s layout of the pattern's ``|`` segments) has no
    term. The pairs are ``layer_specs.coupled_layers``, the rule of the GPT layers."""
    from megatron_moe_spec.core.layer_specs import coupled_layers, moe_layer_numbers

    moe = [n - 1 for n in moe_layer_numbers(config, pattern)]
    pairs = tuple(coupled_layers(config, cp_pipeline, hybrid_layer_pattern=pattern))
    return CouplingSlots(pairs, tuple(i for i in moe if i not in pairs))


# --------------------------------------------------------------------------- after model build
def register_model(model) -> None:
    """After a model chunk is built: check the substitution happened and remember its MoE layers.

    Raises ``RuntimeError`` when the specialization config is on but the decoder was built with
    megatron's stock MoE layer (a code path the patch does not cover, e.g. a legacy model).
    """
    spec_config = _spec_config()
    if not spec_config.enabled:
        return
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron_moe_spec.core.moe_layer import SpecializationMoELayer

    decoder = getattr(model, "decoder", model)
    moe = [m for m in decoder.modules() if isinstance(m, MoELayer)]
    ours = [m for m in moe if isinstance(m, SpecializationMoELayer)]
    if moe and not ours:
        raise RuntimeError(
            "megatron-moe-spec: --moe-spec-* is on but the decoder was built with megatron's stock "
            "MoE layers; is the Megatron-LM patch applied (scripts/apply_megatron_lm_patch.sh), and "
            f"is --spec unset or '{SPEC_MODULE} {SPEC_FUNCTION}'?"
        )
    for layer in ours:
        layer.begin_step(metrics=spec_config.metrics and spec_config.metrics_interval == 1)
        _STATE.layers.append(weakref.ref(layer))


def _begin_step(metrics: bool, step: Optional[int] = None) -> None:
    for ref in _STATE.layers:
        layer = ref()
        if layer is not None:
            layer.begin_step(metrics, step=step)


# ---------------------------------------------------------------------------------- logging
def megatron_track_names(args) -> List[str]:
    """The names core_v0.16.1 and core_v0.19.0's ``training_log`` track for megatron's losses."""
    names = []
    balancing = getattr(args, "moe_router_load_balancing_type", None) or []
    if isinstance(balancing, str):
        balancing = [balancing]
    if any("aux_loss" in t for t in balancing):
        names.append("load_balancing_loss")
    if any("seq_aux_loss" in t for t in balancing):
        names.append("seq_load_balancing_loss")
    if any("global_aux_loss" in t for t in balancing):
        names.append("global_load_balancing_loss")
    if getattr(args, "moe_z_loss_coeff", None) is not None:
        names.append("z_loss")
    return names


def track_names(args, names: Optional[List[str]] = None) -> List[str]:
    """megatron's ``track_names`` (``names``, or recomputed from ``args``) + the enabled losses.

    Only the enabled losses are added: ``training_log`` force-initializes every tracked name, so a
    disabled loss would be logged as a flat 0.
    """
    from megatron_moe_spec.core.aux_losses import COUPLING_LOSS, ORTHOGONALITY_LOSS, SPECIALIZATION_LOSS, VARIANCE_LOSS

    out = list(megatron_track_names(args) if names is None else names)
    spec_config = _spec_config(args)
    for name, coeff in ((SPECIALIZATION_LOSS, spec_config.sp_coeff), (COUPLING_LOSS, spec_config.cp_coeff),
                        (ORTHOGONALITY_LOSS, spec_config.ortho_coeff), (VARIANCE_LOSS, spec_config.var_coeff)):
        if coeff > 0 and name not in out:
            out.append(name)
    return out


# ------------------------------------------------------------------ R_cp: the mean over pairs
@dataclass(frozen=True)
class CouplingSlots:
    """Where R_cp sits in megatron's per-layer tracker (0-based slots of ``num_layers + mtp`` values).

    ``pair_slots``: the earlier layer of each adjacent MoE pair that has an R_cp term (with
    ``cp_pipeline: skip``, pairs split across pipeline stages / model chunks have none; with ``exact``
    the later layer's stage records them there too). ``pairless_slots``: the other slots megatron's
    report counts as MoE layers: the decoder's MoE layers without a pair (always the last one), then
    the MTP layers' slots.
    """

    pair_slots: Tuple[int, ...]
    pairless_slots: Tuple[int, ...]


def coupling_slots(config, cp_pipeline: str = "skip") -> CouplingSlots:
    """``CouplingSlots`` of a ``TransformerConfig`` under a ``cp_pipeline`` policy (the pairs the adapter
    computes R_cp for)."""
    from megatron_moe_spec.core.layer_specs import coupled_layers, moe_layer_numbers

    moe = [n - 1 for n in moe_layer_numbers(config)]
    pairs = tuple(coupled_layers(config, cp_pipeline))
    mtp = config.mtp_num_layers or 0
    pairless = tuple(i for i in moe if i not in pairs) + tuple(range(config.num_layers, config.num_layers + mtp))
    return CouplingSlots(pairs, pairless)


def megatron_moe_layer_count(args) -> int:
    """The number of MoE layers megatron's tracker report divides each tracked loss by (GPT models).

    core_v0.16.1 .. core_v0.19.0: the MoE layers of ``--moe-layer-freq`` plus ``--mtp-num-layers``
    (``track_moe_metrics`` / ``MoEMetricsTracker._count_moe_layers``). Megatron-LM main (2026-08,
    whose ``report`` takes ``num_moe_layers`` from ``training_log``): MTP layers count only when the
    last decoder layer is an MoE layer, once with ``--mtp-use-repeated-layer``.
    """
    hybrid = getattr(args, "hybrid_layer_pattern", None)
    if hybrid is not None:
        return _hybrid_moe_layer_count(args, hybrid)
    freq = getattr(args, "moe_layer_freq", None)
    if freq is None:
        pattern = [1] * args.num_layers
    elif isinstance(freq, int):
        pattern = [1 if i % freq == 0 else 0 for i in range(args.num_layers)]
    else:
        pattern = list(freq)
    mtp = getattr(args, "mtp_num_layers", None) or 0
    if not _report_takes_num_moe_layers():
        return sum(pattern) + mtp
    if mtp and pattern[-1]:
        return sum(pattern) + (1 if getattr(args, "mtp_use_repeated_layer", False) else mtp)
    return sum(pattern)


def _hybrid_moe_layer_count(args, pattern: str) -> int:
    """``megatron_moe_layer_count`` for ``--hybrid-layer-pattern``, as each ``training_log`` computes it.

    core_v0.18.0 .. core_v0.19.0: ``report(num_layers=<E of the pattern, MTP depths included>,
    moe_layer_freq=--moe-layer-freq, mtp_num_layers=--mtp-num-layers)``, counted by megatron's rule
    (freq 1, the default: every one of those). main: the E of the main pattern, plus the E of the MTP
    pattern per depth (once with ``--mtp-use-repeated-layer``)."""
    parts = pattern.split("/")
    main = parts[0]
    mtp = [p for p in parts[1:] if p]
    mtp_e = mtp[0].count("E") if mtp else 0
    if _report_takes_num_moe_layers():
        extra = 0
        if mtp and mtp_e:
            extra = mtp_e if getattr(args, "mtp_use_repeated_layer", False) else mtp_e * len(mtp)
        return main.count("E") + extra
    layers = main.count("E") + mtp_e * len(mtp)
    freq = getattr(args, "moe_layer_freq", None)
    if freq is None:
        n = layers
    elif isinstance(freq, int):
        n = sum(1 for i in range(layers) if i % freq == 0)
    else:
        n = sum(freq)
    return n + (getattr(args, "mtp_num_layers", None) or 0)


def _report_takes_num_moe_layers() -> bool:
    import inspect

    try:
        from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker
    except ImportError:  # megatron-core < 0.18
        return False
    return "num_moe_layers" in inspect.signature(MoEMetricsTracker.report).parameters


def fill_pairless_slots(values_L, slots: CouplingSlots, num_moe_layers: int) -> None:
    """Make ``values_L.sum() / num_moe_layers`` (megatron's report) the mean over R_cp's pairs, in place.

    ``values_L`` is this rank's ``coupling_loss`` tracker tensor before megatron reduces it. Each of
    the ``num_moe_layers - len(pair_slots)`` counted slots without a pair gets this rank's pair sum
    divided by the number of pairs; megatron's reduction (sums over pipeline stages and TPxCP, a
    mean over DP) is linear, so after it each such slot holds the mean over pairs, and the reported
    mean ``(S + missing * S / pairs) / num_moe_layers`` is ``S / pairs``. The pairs' own values are
    untouched (per-layer logging shows them as they are; a slot without a pair shows the pairs' mean).
    Nothing changes when no pair exists (R_cp logs 0) or when every counted slot has a pair.
    """
    pairs = list(slots.pair_slots)
    missing = num_moe_layers - len(pairs)
    if not pairs or missing <= 0:
        return
    targets = [i for i in slots.pairless_slots if i < values_L.numel()][:missing]
    if not targets:
        raise ValueError(f"megatron-moe-spec: coupling_loss has {values_L.numel()} tracker slots, none "
                         f"for the {missing} MoE layers without an R_cp pair")
    share = values_L[pairs].sum() / len(pairs)
    for i in targets:
        values_L[i] += share
    if len(targets) < missing:  # megatron counts more MoE layers than the tracker has free slots
        values_L[targets[-1]] += share * (missing - len(targets))


def report_coupling_as_pair_mean(args) -> None:
    """The ``training_log`` hook before megatron's MoE tracker report (every rank, every iteration).

    megatron reports each tracked loss as the sum over layers divided by the number of MoE layers;
    R_cp has one term per adjacent MoE pair (none for the last MoE layer, none for pairs split across
    pipeline stages, none in MTP layers), so its report would be ``pairs / MoE layers`` of the mean
    over pairs. This fills the counted slots without a pair (``fill_pairless_slots``) so that the
    reported ``coupling_loss`` (console, TensorBoard, W&B) is the mean over the pairs that exist.
    Call it exactly once per report, after the last micro-batch and before the report.
    """
    if _spec_config(args).cp_coeff <= 0 or _STATE.coupling is None:
        return
    from megatron_moe_spec.core import moe_tracker
    from megatron_moe_spec.core.aux_losses import COUPLING_LOSS

    values = moe_tracker.values(COUPLING_LOSS)
    if values is not None:
        fill_pairless_slots(values, _STATE.coupling, megatron_moe_layer_count(args))


def metric_scalars(report: dict, per_layer: bool) -> dict:
    """``layer_metrics.report()`` -> TensorBoard tags: ``moe/<name>`` (mean over MoE layers) and,
    with ``per_layer``, ``moe/<name>_layer_<i>`` (megatron's per-layer tag style)."""
    out = {}
    for key, value in report.items():
        if key == "matrices":
            continue
        if "/layer_" in key:
            if per_layer:
                name, i = key.split("/layer_")
                out[f"moe/{name}_layer_{i}"] = float(value)
        else:
            out[f"moe/{key}"] = float(value)
    return out


def log_specialization_metrics(iteration: int, writer=None, wandb_writer=None) -> Optional[dict]:
    """The ``training_log`` hook for the routing metrics. A collective: call it on every rank.

    Every ``metrics_interval`` iterations: reduces the statistics collected since the last report
    (``layer_metrics.report()``, one all-reduce over the world), writes ``moe/<metric>`` (and
    per-layer tags with ``--moe-per-layer-logging``) to TensorBoard / W&B and prints one line on the
    last rank. Then turns collection on for the next iteration iff it will be reported. Returns the
    scalars written (None when nothing was reported).
    """
    spec_config = _spec_config()
    if not spec_config.metrics:
        _begin_step(False, iteration + 1)  # the next step starts: R_cp's recompute queues are emptied
        return None
    interval = spec_config.metrics_interval
    scalars = None
    if iteration % interval == 0:
        from megatron_moe_spec.core import layer_metrics

        report = layer_metrics.report()
        if _collected_tokens(report) > 0:  # nothing collected (e.g. the first step after a resume)
            args = _megatron_args()
            per_layer = bool(getattr(args, "moe_per_layer_logging", False))
            scalars = metric_scalars(report, per_layer)
            if writer is not None:
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, iteration)
            if wandb_writer is not None:
                wandb_writer.log(scalars, iteration)
            _print_last(f" [moe-spec] iteration {iteration:8d} | " + " | ".join(
                f"{tag[4:]}: {value:.4g}" for tag, value in scalars.items() if "_layer_" not in tag))
    _begin_step((iteration + 1) % interval == 0, iteration + 1)
    return scalars


def _collected_tokens(report: dict) -> float:
    matrices = report.get("matrices") or {}
    return sum(sum(m.get("tokens_per_expert", [])) for m in matrices.values())


def _print_last(line: str) -> None:
    try:
        from megatron.training.utils import print_rank_last
    except ImportError:
        print(line, flush=True)
        return
    print_rank_last(line)
