"""``RunConfig``: the YAML configuration of one training run, its loading and its validation.

A run is described by one or more YAML files (merged left to right, each may ``include:`` base
files) plus ``--set key.path=value`` overrides. The result is a ``RunConfig``: one small dataclass
per section (``model``, ``parallel``, ``training``, ``data``, ``eval``, ``logging``,
``checkpoint``) and the ``specialization`` block (a ``SpecializationConfig``).

Everything a training driver needs comes from this object:

- ``megatron_config_kwargs(cfg, cpu=...)``: the kwargs of megatron-core's ``TransformerConfig``;
- ``gpt_model_kwargs(cfg)``: the remaining ``GPTModel`` kwargs (vocab, position embedding, ...);
  ``hybrid_model_kwargs(cfg)`` those of ``HybridModel`` (``model.hybrid_layer_pattern`` set);
- ``optimizer_config_kwargs(cfg)`` / ``lr_scheduler_kwargs(cfg)``: megatron-core's
  ``OptimizerConfig`` and ``OptimizerParamScheduler`` kwargs;
- ``validate_for_world_size(cfg, world_size)`` -> ``ParallelSizes`` (dp, expert dp, micro-batches);
- ``cfg.specialization`` (the ``SpecializationConfig``), ``cfg.data`` (paths), ``cfg.to_dict()``
  (what the driver writes into ``RUN_DIR/config.yaml``; it loads back to an equal config).

Validation happens before anything expensive and raises ``ConfigError`` (a ``ValueError``) with ONE
message that names the full key (``model.num_moe_experts``) and says how to fix it.

Layering (docs/design.md): this module imports only the standard library and pyyaml at import
time. ``megatron_config_kwargs`` and ``optimizer_config_kwargs`` import torch inside the function
(they must hand torch objects such as ``F.silu`` and ``torch.bfloat16`` to megatron-core).
"""
import copy
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union, get_args, get_origin

import yaml

from megatron_moe_spec.specialization_config import SpecializationConfig

__all__ = [
    "ConfigError",
    "ModelConfig",
    "ParallelConfig",
    "TrainingConfig",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "CheckpointConfig",
    "RunConfig",
    "ParallelSizes",
    "ParamCount",
    "SECTIONS",
    "load_run_config",
    "load_yaml_file",
    "apply_override",
    "validate_for_world_size",
    "megatron_config_kwargs",
    "gpt_model_kwargs",
    "hybrid_model_kwargs",
    "hybrid_model_available",
    "installed_megatron_core_version",
    "optimizer_config_kwargs",
    "lr_scheduler_kwargs",
    "count_parameters",
    "config_warnings",
    "padded_vocab_size",
    "resolve_backend",
    "transformer_engine_importable",
]


class ConfigError(ValueError):
    """An invalid run configuration. ``key`` is the full dotted key at fault (e.g.
    ``model.num_moe_experts``), or the file / ``--set`` argument when no key applies."""

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key
        self.message = message


def _f(default=None, help: str = "", *, choices=None, ge=None, gt=None, required=False,
       default_factory=None, example=None):
    """A config field with the metadata the validator and the docs use."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "required": required,
            "example": example}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# ====================================================================== hybrid layer patterns
HYBRID_ATTENTION, HYBRID_MLP, HYBRID_MOE = "*", "-", "E"
HYBRID_GPU_ONLY = {"M": "Mamba", "G": "gated delta net", "D": "DeepSeek sparse attention"}
"""megatron-core 0.19's other layer symbols: accepted here, refused at spec build
(``core.hybrid.check_hybrid_pattern``) unless their CUDA kernels import."""
HYBRID_PIPE, HYBRID_MTP = "|", "/"
HYBRID_MIN_MEGATRON_CORE = "0.19"


# ====================================================================== sections
@dataclass
class ModelConfig:
    """The model: a GPT decoder (a HybridModel with hybrid_layer_pattern), Megatron's options and names."""

    num_layers: int = _f(
        None, "Number of transformer layers (GPTModel); with hybrid_layer_pattern the number of its "
        "layer symbols (null = derived from the pattern).", ge=1, required=True, example=12)
    hidden_size: int = _f(None, "Hidden size H.", ge=1, required=True, example=768)
    num_attention_heads: int = _f(None, "Attention heads.", ge=1, required=True, example=12)
    num_query_groups: Optional[int] = _f(
        None, "Key/value groups for grouped-query attention; null = num_attention_heads (MHA).", ge=1)
    kv_channels: Optional[int] = _f(
        None, "Per-head dimension; null = hidden_size / num_attention_heads.", ge=1)
    ffn_hidden_size: Optional[int] = _f(
        None, "FFN width of the dense (non-MoE) layers; null = 4 * hidden_size (TransformerConfig's "
        "default).", ge=1)
    seq_length: int = _f(None, "Training sequence length S.", ge=1, required=True, example=1024)
    max_position_embeddings: Optional[int] = _f(
        None, "Positions the model supports (learned_absolute embedding size); null = seq_length.", ge=1)
    vocab_size: int = _f(
        None, "Tokenizer vocabulary size (mock data draws tokens below it).", ge=2, required=True,
        example=50257)
    make_vocab_size_divisible_by: int = _f(
        128, "Pad the vocabulary to a multiple of this times parallel.tp (Megatron-LM's rule).", ge=1)
    normalization: str = _f("RMSNorm", "LayerNorm or RMSNorm.", choices=("LayerNorm", "RMSNorm"))
    layernorm_epsilon: float = _f(1e-5, "Epsilon of the norms.", gt=0)
    position_embedding_type: str = _f(
        "rope", "rope, learned_absolute or none.", choices=("rope", "learned_absolute", "none"))
    rotary_base: int = _f(10000, "RoPE base.", ge=1)
    rotary_percent: float = _f(1.0, "Fraction of each head's dimensions that RoPE rotates.", gt=0)
    swiglu: bool = _f(
        True, "SwiGLU MLPs (gated_linear_unit with silu). false = GeLU MLPs. R_sp and L_o need it.")
    add_bias_linear: bool = _f(False, "Biases in the linear layers (Megatron's --disable-bias-linear = false).")
    add_qkv_bias: bool = _f(False, "Bias in the QKV projection only.")
    qk_layernorm: bool = _f(False, "Normalize queries and keys.")
    untie_embeddings_and_output_weights: bool = _f(
        True, "Separate input embedding and output layer weights.")
    hidden_dropout: float = _f(0.0, "Dropout after attention / MLP (Megatron's default is 0.1).", ge=0)
    attention_dropout: float = _f(0.0, "Dropout on attention probabilities (Megatron's default is 0.1).", ge=0)
    init_method_std: float = _f(0.02, "Std of the normal weight initialization.", gt=0)
    transformer_impl: str = _f(
        "local", "local (pure PyTorch, runs on CPU), transformer_engine (GPU, needs TE) or auto "
        "(transformer_engine on a CUDA run when Transformer Engine is importable, local otherwise).",
        choices=("local", "transformer_engine", "auto"))

    hybrid_layer_pattern: Optional[str] = _f(
        None, "Build megatron-core's HybridModel (megatron-core >= 0.19) instead of GPTModel: one "
        "symbol per layer, * attention, - dense MLP, E MoE (M Mamba, G gated delta net, D DeepSeek "
        "sparse attention: GPU only, refused without their CUDA kernels); | splits pipeline stages "
        "(segments = parallel.pp * vpp). A GPT layer is *E (MoE) or *- (dense). The E layers "
        "place the MoE layers: leave moe_layer_freq at 1. null = GPTModel.", example="*-*E*E*E")

    # ---- MoE (megatron-core names and semantics)
    num_moe_experts: Optional[int] = _f(None, "Routed experts E per MoE layer; null = dense model.", ge=1)
    moe_layer_freq: Union[int, List[int]] = _f(
        1, "Which layers are MoE: an int N makes layer i MoE when i % N == 0; a list of 0/1 of "
        "length num_layers gives the pattern (e.g. [0,1,1,1] = first layer dense).")
    moe_ffn_hidden_size: Optional[int] = _f(None, "FFN width F of each routed expert; null = ffn_hidden_size.", ge=1)
    moe_router_topk: int = _f(2, "Experts per token k.", ge=1)
    moe_shared_expert_intermediate_size: Optional[int] = _f(
        None, "Total width of the shared expert(s) (num_shared * width); null = no shared expert.", ge=1)
    moe_shared_expert_gate: bool = _f(False, "Sigmoid gate on the shared expert output.")
    moe_shared_expert_overlap: bool = _f(
        False, "Overlap the shared expert with dispatch communication (alltoall dispatcher only).")
    moe_router_score_function: str = _f("softmax", "softmax or sigmoid.", choices=("softmax", "sigmoid"))
    moe_router_pre_softmax: bool = _f(
        False, "Score function before top-k (required for top-1 with softmax).")
    moe_router_topk_scaling_factor: Optional[float] = _f(None, "Scale of the top-k gates; null = 1.", gt=0)
    moe_router_num_groups: Optional[int] = _f(None, "Expert groups for group-limited routing.", ge=1)
    moe_router_group_topk: Optional[int] = _f(None, "Groups selected per token in group-limited routing.", ge=1)
    moe_router_enable_expert_bias: bool = _f(
        False, "Aux-loss-free balancing with a per-expert bias (sigmoid score function only).")
    moe_router_bias_update_rate: float = _f(1e-3, "Update rate of the expert bias.", ge=0)
    moe_router_dtype: Optional[str] = _f(
        None, "Router computation dtype: null (model dtype), fp32 or fp64.", choices=(None, "fp32", "fp64"))
    moe_router_load_balancing_type: Union[str, List[str]] = _f(
        "aux_loss", "aux_loss, seq_aux_loss, global_aux_loss, sinkhorn or none; or a list of them "
        "(then moe_aux_loss_coeff is a list of the same length).")
    moe_aux_loss_coeff: Union[float, List[float]] = _f(
        0.0, "lambda_lb, coefficient of Megatron's load-balancing loss (paper: 1e-2).")
    moe_z_loss_coeff: Optional[float] = _f(None, "Router z-loss coefficient; null = off (paper: 1e-3 when on).", ge=0)
    moe_input_jitter_eps: Optional[float] = _f(None, "Multiplicative jitter on the router input; null = off.", gt=0)
    moe_token_dispatcher_type: str = _f(
        "allgather", "allgather or alltoall (flex is refused, see docs).",
        choices=("allgather", "alltoall", "flex"))
    moe_expert_capacity_factor: Optional[float] = _f(
        None, "Capacity factor; null = dropless (no token dropped).", gt=0)
    moe_pad_expert_input_to_capacity: bool = _f(
        False, "Pad each expert's input to its capacity (needs moe_expert_capacity_factor).")
    moe_token_drop_policy: str = _f("probs", "Which tokens are dropped over capacity: probs or position.",
                                    choices=("probs", "position"))
    moe_grouped_gemm: Union[bool, str] = _f(
        False, "Grouped GEMM experts (GPU only: with transformer_engine, TEGroupedMLP). auto = true "
        "when transformer_impl resolves to transformer_engine, false with local (SequentialMLP).",
        choices=(False, True, "auto"))
    moe_permute_fusion: bool = _f(False, "Fused token permutation (GPU only: needs TE >= 2.1).")

    # ------------------------------------------------------------- derived
    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    @property
    def resolved_ffn_hidden_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    @property
    def resolved_moe_ffn_hidden_size(self) -> int:
        return (self.moe_ffn_hidden_size if self.moe_ffn_hidden_size is not None
                else self.resolved_ffn_hidden_size)

    @property
    def resolved_num_query_groups(self) -> int:
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    @property
    def resolved_kv_channels(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def is_hybrid(self) -> bool:
        """A HybridModel (``hybrid_layer_pattern`` set) rather than a GPTModel."""
        return self.hybrid_layer_pattern is not None

    @property
    def hybrid_layer_symbols(self) -> str:
        """The pattern's layer symbols, one per layer (``|`` removed); "" for a GPTModel."""
        return (self.hybrid_layer_pattern or "").replace(HYBRID_PIPE, "")

    @property
    def hybrid_segments(self) -> List[str]:
        """The pattern's pipeline segments (split at ``|``); [] for a GPTModel."""
        return self.hybrid_layer_pattern.split(HYBRID_PIPE) if self.is_hybrid else []

    @property
    def moe_layer_pattern(self) -> List[int]:
        """1 for each MoE layer, 0 for each other layer (Megatron's parsing of moe_layer_freq; with
        hybrid_layer_pattern: 1 for each E)."""
        if self.is_hybrid:
            return [1 if c == HYBRID_MOE else 0 for c in self.hybrid_layer_symbols]
        if not self.is_moe:
            return [0] * self.num_layers
        if isinstance(self.moe_layer_freq, int):
            return [1 if i % self.moe_layer_freq == 0 else 0 for i in range(self.num_layers)]
        return list(self.moe_layer_freq)

    @property
    def moe_layer_indices(self) -> List[int]:
        """0-based indices of the MoE layers (the ``layer_i`` of the metrics)."""
        return [i for i, m in enumerate(self.moe_layer_pattern) if m]


@dataclass
class ParallelConfig:
    """Parallel sizes (Megatron names in brackets); data parallel is implied by the world size."""

    tp: int = _f(1, "Tensor parallel size [tensor_model_parallel_size].", ge=1)
    pp: int = _f(1, "Pipeline parallel size [pipeline_model_parallel_size].", ge=1)
    vpp: Optional[int] = _f(
        None, "Virtual pipeline stages per rank (interleaved schedule) "
        "[virtual_pipeline_model_parallel_size]; null = off.", ge=1)
    cp: int = _f(1, "Context parallel size [context_parallel_size] (GPU only).", ge=1)
    ep: int = _f(1, "Expert parallel size [expert_model_parallel_size].", ge=1)
    etp: Optional[int] = _f(
        None, "Expert tensor parallel size [expert_tensor_parallel_size]; null = tp.", ge=1)
    sp: bool = _f(False, "Sequence parallel [sequence_parallel]; required with tp > 1 and MoE.")

    @property
    def resolved_etp(self) -> int:
        return self.etp if self.etp is not None else self.tp


RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")


@dataclass
class TrainingConfig:
    """Optimization and numerics."""

    micro_batch_size: int = _f(1, "Sequences per micro-batch per data-parallel rank.", ge=1)
    global_batch_size: Optional[int] = _f(
        None, "Sequences per optimizer step; null = micro_batch_size * dp (no accumulation).", ge=1)
    train_iters: int = _f(None, "Optimizer steps.", ge=1, required=True, example=1000)
    lr: float = _f(None, "Peak learning rate.", gt=0, required=True, example=3e-4)
    min_lr: float = _f(0.0, "Final learning rate of the decay.", ge=0)
    lr_warmup_iters: int = _f(0, "Linear warm-up steps.", ge=0)
    lr_decay_iters: Optional[int] = _f(None, "Steps of the decay; null = train_iters.", ge=1)
    lr_decay_style: str = _f(
        "cosine", "constant, linear, cosine or inverse-square-root (Megatron's default is linear).",
        choices=("constant", "linear", "cosine", "inverse-square-root"))
    optimizer: str = _f("adam", "adam (AdamW with decoupled weight decay) or sgd.", choices=("adam", "sgd"))
    weight_decay: float = _f(0.01, "Weight decay.", ge=0)
    adam_beta1: float = _f(0.9, "Adam beta1.", ge=0)
    adam_beta2: float = _f(0.95, "Adam beta2 (Megatron's default is 0.999).", ge=0)
    adam_eps: float = _f(1e-8, "Adam epsilon.", gt=0)
    clip_grad: float = _f(1.0, "Gradient-norm clipping; 0 = off.", ge=0)
    precision: str = _f("fp32", "fp32, bf16 or fp16 (mixed precision, Megatron's --bf16 / --fp16).",
                        choices=("fp32", "bf16", "fp16"))
    use_distributed_optimizer: bool = _f(False, "Shard optimizer state over data parallel ranks.")
    seed: int = _f(1234, "Random seed.", ge=0)
    recompute_granularity: str = _f(
        "none", "Activation recomputation: none, full (whole layers) or selective (recompute_modules).",
        choices=("none", "full", "selective"))
    recompute_method: Optional[str] = _f(
        None, "With full: uniform or block (required); must be null with selective.",
        choices=(None, "uniform", "block"))
    recompute_num_layers: Optional[int] = _f(
        None, "With full: layers per recompute unit (uniform) or per stage (block); null otherwise.", ge=1)
    recompute_modules: Optional[List[str]] = _f(
        None, "With selective: submodules to recompute (" + ", ".join(RECOMPUTE_MODULES)
        + "); null = [core_attn].")
    calculate_per_token_loss: bool = _f(
        False, "Average the loss over all tokens of the global batch instead of per micro-batch.")
    device: str = _f(
        "auto", "cpu, cuda or auto (cuda when available). Chooses the CPU or GPU kernel options of "
        "megatron_config_kwargs.", choices=("auto", "cpu", "cuda"))


@dataclass
class DataConfig:
    """Training data."""

    type: str = _f("mock", "mock (megatron-core's MockGPTDataset with synthetic, learnable "
                   "documents of 3 domains; no files) or indexed (megatron-core .bin/.idx files).", choices=("mock", "indexed"))
    paths: List[str] = _f(
        help="indexed: dataset prefixes (PREFIX.bin and PREFIX.idx must exist); relative paths are "
        "relative to the working directory. Must be empty for mock.", default_factory=list)
    weights: Optional[List[float]] = _f(
        None, "Blend weights, one per path; null = proportional to size.")
    split: str = _f("969,30,1", "Train,valid,test split weights of each dataset (Megatron's --split).")
    tokenizer_path: Optional[str] = _f(
        None, "indexed: the tokenizer (a HuggingFace tokenizer.json or directory); must exist.")
    domain_labels: bool = _f(
        True, "Give the routing metrics each token's domain (expert x domain counts, domain_mi): the "
        "per-token domain the dataset provides (the prepared corpus, mock data), else the index of the "
        "token's prefix in paths (>= 2 paths). false = no domain metrics.")


@dataclass
class EvalConfig:
    """Validation during training."""

    interval: int = _f(1000, "Evaluate every this many steps; 0 = never.", ge=0)
    iters: int = _f(10, "Validation micro-batch iterations per evaluation.", ge=1)


@dataclass
class LoggingConfig:
    """Where and how the run reports."""

    run_dir: Optional[str] = _f(
        None, "The run directory (docs/design.md); null = runs/<stems of the config files joined "
        "by '+'>, filled in at load time.")
    log_interval: int = _f(10, "Log metrics every this many steps.", ge=1)
    tensorboard: bool = _f(True, "Write TensorBoard event files to RUN_DIR/tensorboard.")
    wandb_project: Optional[str] = _f(None, "Weights & Biases project; null = no wandb.")
    progress_bar: bool = _f(True, "Show a progress bar on rank 0.")


@dataclass
class CheckpointConfig:
    """Checkpoints in RUN_DIR/checkpoints."""

    save_interval: int = _f(0, "Save every this many steps; 0 = no periodic checkpoints.", ge=0)
    save_final: bool = _f(True, "Save a checkpoint when training ends.")
    resume: str = _f(
        "auto", "auto (resume from RUN_DIR/checkpoints/latest if present), none (start fresh), or "
        "a checkpoint directory (must exist).")


SECTIONS: Dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "eval": EvalConfig,
    "logging": LoggingConfig,
    "checkpoint": CheckpointConfig,
    "specialization": SpecializationConfig,
}
_TOP_LEVEL_EXTRA = ("include",)  # consumed by the loader, never in a RunConfig


@dataclass
class RunConfig:
    """One run. Build it with ``load_run_config`` (files) or ``RunConfig.from_dict`` (a dict)."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    specialization: SpecializationConfig = field(default_factory=SpecializationConfig)

    # ------------------------------------------------------------- conversion
    @classmethod
    def from_dict(cls, values: dict, *, check_paths: bool = True) -> "RunConfig":
        """Build from a plain dict (the merged YAML) and validate it (``validate``)."""
        if not isinstance(values, dict):
            raise ConfigError(f"a run config must be a mapping of sections, got {type(values).__name__}")
        _check_structure(values, where=None)
        if "include" in values:
            raise ConfigError("include: is resolved by load_run_config, not by RunConfig.from_dict",
                              key="include")
        if "model" not in values:
            raise ConfigError(
                "model: section missing; every run needs at least model.num_layers, hidden_size, "
                "num_attention_heads, seq_length and vocab_size", key="model")
        sections = {}
        for name, section_cls in SECTIONS.items():
            raw = dict(values.get(name) or {})
            if section_cls is SpecializationConfig:
                try:
                    sections[name] = SpecializationConfig.from_dict(raw)
                except ValueError as e:
                    raise _specialization_error(e) from None
            else:
                sections[name] = section_cls(**copy.deepcopy(raw))
        cfg = cls(**sections)
        cfg.validate(check_paths=check_paths)
        return cfg

    def to_dict(self) -> dict:
        """The fully resolved config as plain YAML-able data (every key, defaults included)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         width=100)

    def save(self, path: str) -> None:
        """Write the resolved config (e.g. ``RUN_DIR/config.yaml``)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(self.to_yaml())

    # ------------------------------------------------------------- checks
    def validate(self, *, check_paths: bool = True) -> None:
        """Field types and ranges, then the cross-field rules. ``check_paths`` checks that the data
        and checkpoint paths exist (on by default; the error says "missing data path")."""
        for name, section_cls in SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, section_cls):
                raise ConfigError(f"{name} must be a {section_cls.__name__}", key=name)
            if section_cls is SpecializationConfig:
                try:
                    section.validate()
                except ValueError as e:
                    raise _specialization_error(e) from None
            else:
                if section_cls is ModelConfig:
                    _check_hybrid_pattern(section)  # first: it may fill in num_layers
                _check_fields(name, section)
        _check_cross_fields(self, check_paths=check_paths)

    def warnings(self) -> List[str]:
        return config_warnings(self)

    # ------------------------------------------------------------- shortcuts for drivers
    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self)

    def parallel_sizes(self, world_size: int) -> "ParallelSizes":
        return validate_for_world_size(self, world_size)

    def transformer_config_kwargs(self, cpu: Optional[bool] = None) -> dict:
        return megatron_config_kwargs(self, cpu=cpu)

    def parameter_count(self) -> "ParamCount":
        return count_parameters(self)


# ====================================================================== YAML loading
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot) as a float, as YAML 1.2 and humans do.
    (PyYAML follows YAML 1.1, where ``2e-3`` is the *string* "2e-3".)"""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """Block style for mappings, flow style for lists of scalars ([0, 1, 1, 1])."""


def _represent_list(dumper, data):
    flow = all(not isinstance(v, (list, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def _yaml_load(text: str, where: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        hint = ""
        if "alias" in str(e) or "anchor" in str(e):
            hint = ("\n(a model.hybrid_layer_pattern must be quoted: * starts a YAML alias, e.g. "
                    "hybrid_layer_pattern: \"*E*E\")")
        raise ConfigError(f"{where}: not valid YAML: {e}{hint}", key=where) from None


def load_yaml_file(path: str, _stack: Tuple[str, ...] = ()) -> dict:
    """Read one config file and resolve its ``include:`` (recursively, relative to the file).

    The included files are merged first (in list order), then this file's own keys over them.
    Unknown keys are reported here, per file, with the file name.
    """
    apath = os.path.abspath(path)
    if apath in _stack:
        chain = " -> ".join(os.path.relpath(p) for p in _stack + (apath,))
        raise ConfigError(f"{path}: include cycle: {chain}; remove one of these include: entries",
                          key="include")
    if not os.path.isfile(apath):
        hint = f" (included from {os.path.relpath(_stack[-1])})" if _stack else ""
        raise ConfigError(f"config file not found: {path}{hint}", key=path)
    with open(apath) as f:
        data = _yaml_load(f.read(), path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections (model:, training:, ...), "
                          f"got {type(data).__name__}", key=path)
    _check_structure(data, where=path)
    includes = data.pop("include", None)
    if includes is None:
        includes = []
    elif isinstance(includes, str):
        includes = [includes]
    elif not (isinstance(includes, list) and all(isinstance(i, str) for i in includes)):
        raise ConfigError(f"{path}: include must be a file path or a list of file paths, got {includes!r}",
                          key="include")
    merged: dict = {}
    base_dir = os.path.dirname(apath)
    for inc in includes:
        inc = os.path.expanduser(inc)
        inc_path = inc if os.path.isabs(inc) else os.path.join(base_dir, inc)
        merged = _deep_merge(merged, load_yaml_file(inc_path, _stack + (apath,)))
    return _deep_merge(merged, data)


def _deep_merge(base: dict, over: dict) -> dict:
    """Mappings merge key by key (recursively); anything else (scalars, lists) replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_override(values: dict, override: str) -> None:
    """Apply one ``key.path=value`` (value parsed as YAML) to the merged dict, in place."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set training.lr=1e-4",
                          key="--set")
    path, raw = override.split("=", 1)
    path = path.strip()
    parts = path.split(".")
    if len(parts) != 2 or not all(parts):
        section = parts[0]
        if len(parts) == 1 and section in SECTIONS:
            raise ConfigError(f"--set {path}: {section} is a section; set one of its keys, e.g. "
                              f"--set {section}.{_field_names(SECTIONS[section])[0]}=...", key=path)
        raise ConfigError(f"--set {path}: expected SECTION.KEY=VALUE (e.g. model.num_moe_experts=8)",
                          key=path)
    section, leaf = parts
    if section not in SECTIONS:
        raise ConfigError(f"--set {path}: unknown section {section!r}{_suggest(section, SECTIONS)}; "
                          f"sections are {', '.join(SECTIONS)}", key=path)
    known = _field_names(SECTIONS[section])
    if leaf not in known:
        raise ConfigError(f"--set {path}: unknown key{_suggest_key(section, leaf)}", key=path)
    value = _yaml_load(raw, f"--set {path}")
    sec = values.setdefault(section, {})
    if sec is None:
        sec = values[section] = {}
    sec[leaf] = value


def load_run_config(paths, overrides=(), *, check_paths: bool = True) -> RunConfig:
    """Load, merge (left to right), override and validate a run config.

    ``paths``: one or more YAML files; ``overrides``: ``key.path=value`` strings. When
    ``logging.run_dir`` is null it becomes ``runs/<stem>[+<stem>...]`` of the files given here.
    """
    if isinstance(paths, str):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ConfigError("no config file given", key=None)
    merged: dict = {}
    for p in paths:
        merged = _deep_merge(merged, load_yaml_file(p))
    for ov in overrides or ():
        apply_override(merged, ov)
    logging_sec = merged.get("logging") or {}
    if logging_sec.get("run_dir") is None:
        stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
        merged.setdefault("logging", {})
        if merged["logging"] is None:
            merged["logging"] = {}
        merged["logging"]["run_dir"] = os.path.join("runs", "+".join(stems))
    return RunConfig.from_dict(merged, check_paths=check_paths)


# ====================================================================== field checks
def _field_names(cls) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _suggest(word: str, candidates) -> str:
    """"; did you mean 'x'?" for the closest candidate (case-insensitive), or ""."""
    by_lower = {str(c).lower(): c for c in candidates}
    m = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[m[0]]!r}?" if m else ""


def _suggest_key(section: str, leaf: str) -> str:
    """Did-you-mean for a key: first in its own section, then the same key in another section."""
    m = difflib.get_close_matches(leaf, _field_names(SECTIONS[section]), n=1, cutoff=0.6)
    if m:
        return f"; did you mean {section}.{m[0]}?"
    for other, cls in SECTIONS.items():
        if other != section and leaf in _field_names(cls):
            return f"; did you mean {other}.{leaf}? ({leaf} belongs to the {other}: section)"
    best = None
    for other, cls in SECTIONS.items():
        mm = difflib.get_close_matches(leaf, _field_names(cls), n=1, cutoff=0.75)
        if mm and other != section:
            best = f"{other}.{mm[0]}"
            break
    if best:
        return f"; did you mean {best}?"
    return f"; the keys of {section}: are {', '.join(_field_names(SECTIONS[section]))}"


def _check_structure(values: dict, where: Optional[str]) -> None:
    """Unknown sections / keys, and sections that are not mappings."""
    prefix = f"{where}: " if where else ""
    for section, content in values.items():
        if section in _TOP_LEVEL_EXTRA:
            continue
        if section not in SECTIONS:
            hint = _suggest(str(section), list(SECTIONS) + list(_TOP_LEVEL_EXTRA))
            if not hint:
                for name, cls in SECTIONS.items():
                    if section in _field_names(cls):
                        hint = f"; {section} belongs to the {name}: section ({name}.{section})"
                        break
            raise ConfigError(f"{prefix}unknown section {section!r}{hint}; sections are "
                              f"{', '.join(SECTIONS)} (and include)", key=str(section))
        if content is None:
            continue
        if not isinstance(content, dict):
            raise ConfigError(f"{prefix}{section}: must be a mapping of keys, got {content!r}", key=section)
        known = _field_names(SECTIONS[section])
        for key in content:
            if key not in known:
                raise ConfigError(
                    f"{prefix}unknown key {section}.{key}{_suggest_key(section, str(key))}",
                    key=f"{section}.{key}")


def _describe(tp) -> str:
    origin = get_origin(tp)
    if origin is Union:
        args = get_args(tp)
        parts = [_describe(a) for a in args if a is not type(None)]
        s = " or ".join(parts)
        return s + " or null" if type(None) in args else s
    if origin in (list, List):
        (inner,) = get_args(tp)
        return f"a list of {_describe(inner).replace('a ', '', 1).replace('an ', '', 1)}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


_NO_MATCH = object()


def _coerce(value, tp):
    """Return the value converted to ``tp`` (int -> float only), or _NO_MATCH."""
    origin = get_origin(tp)
    if origin is Union:
        if value is None:
            return None if type(None) in get_args(tp) else _NO_MATCH
        for a in get_args(tp):
            if a is type(None):
                continue
            r = _coerce(value, a)
            if r is not _NO_MATCH:
                return r
        return _NO_MATCH
    if origin in (list, List):
        if not isinstance(value, list):
            return _NO_MATCH
        (inner,) = get_args(tp)
        out = [_coerce(v, inner) for v in value]
        return _NO_MATCH if any(o is _NO_MATCH for o in out) else out
    if tp is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _NO_MATCH
    if tp is str:
        return value if isinstance(value, str) else _NO_MATCH
    return value


def _check_fields(section: str, obj) -> None:
    """Types (with int -> float coercion), required keys, choices and ranges of one section."""
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}"
        meta = f.metadata
        value = getattr(obj, f.name)
        if value is None and meta.get("required"):
            raise ConfigError(f"{key}: is required; set it in your YAML ({section}: {{{f.name}: "
                              f"{meta.get('example')}}}) or with --set {key}=...", key=key)
        coerced = _coerce(value, f.type)
        choices = meta.get("choices")
        if coerced is _NO_MATCH and choices is not None:
            shown = ", ".join(_fmt_default(c) for c in choices)
            raise ConfigError(f"{key}: must be one of {shown}; got {value!r} ({type(value).__name__})",
                              key=key)
        if coerced is _NO_MATCH:
            raise ConfigError(f"{key}: must be {_describe(f.type)}, got {value!r} "
                              f"({type(value).__name__}); fix the value in your YAML", key=key)
        setattr(obj, f.name, coerced)
        value = coerced
        if choices is not None and value not in choices:
            shown = ", ".join(_fmt_default(c) for c in choices)
            hint = _suggest(str(value), [c for c in choices if c is not None])
            raise ConfigError(f"{key}: must be one of {shown}; got {value!r}{hint}", key=key)
        for bound, op, word in ((meta.get("ge"), lambda a, b: a >= b, ">="),
                                (meta.get("gt"), lambda a, b: a > b, ">")):
            if bound is None or value is None:
                continue
            items = value if isinstance(value, list) else [value]
            for v in items:
                if isinstance(v, (int, float)) and not op(v, bound):
                    raise ConfigError(f"{key}: must be {word} {bound}, got {value!r}", key=key)


def _specialization_error(e: ValueError) -> ConfigError:
    msg = str(e)
    m = re.search(r"specialization\.(\w+)", msg)
    key = f"specialization.{m.group(1)}" if m else "specialization"
    if m is None and msg.startswith("unknown key(s) in specialization"):
        names = msg.split(":", 1)[1].split(";")[0].strip().split(", ")
        key = f"specialization.{names[0]}"
        msg = f"unknown key {key}{_suggest_key('specialization', names[0])}"
    if msg.startswith(key + " "):
        msg = f"{key}: {msg[len(key) + 1:]}"
    return ConfigError(msg, key=key)


# ====================================================================== cross-field checks
LB_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
_CAPACITY_LB_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


def _err(key: str, message: str) -> ConfigError:
    return ConfigError(f"{key}: {message}", key=key)


def _check_cross_fields(cfg: RunConfig, check_paths: bool) -> None:
    m, p, t, d = cfg.model, cfg.parallel, cfg.training, cfg.data
    s = cfg.specialization

    # ---- model shape
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads != 0:
        raise _err("model.num_attention_heads",
                   f"hidden_size {m.hidden_size} is not divisible by num_attention_heads "
                   f"{m.num_attention_heads}; choose heads that divide it or set model.kv_channels")
    groups = m.resolved_num_query_groups
    if m.num_attention_heads % groups != 0:
        raise _err("model.num_query_groups",
                   f"num_attention_heads {m.num_attention_heads} must be a multiple of num_query_groups "
                   f"{groups}; choose a divisor of the head count (or null for MHA)")
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        raise _err("model.max_position_embeddings",
                   f"{m.max_position_embeddings} is smaller than model.seq_length {m.seq_length}; "
                   f"raise it or set it to null (= seq_length)")

    if m.is_hybrid:
        _check_hybrid(cfg)

    # ---- MoE
    moe_only = ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_num_groups",
                "moe_router_group_topk", "moe_expert_capacity_factor", "moe_z_loss_coeff")
    if not m.is_moe:
        for name in moe_only:
            if getattr(m, name) is not None:
                raise _err(f"model.{name}", "is set but model.num_moe_experts is null (a dense model); "
                           "set model.num_moe_experts or remove this key")
        if isinstance(m.moe_layer_freq, list):
            raise _err("model.moe_layer_freq", "is a list but model.num_moe_experts is null; set "
                       "model.num_moe_experts or remove model.moe_layer_freq")
        if p.ep > 1:
            raise _err("parallel.ep", f"ep={p.ep} needs an MoE model; set model.num_moe_experts or ep: 1")
    else:
        _check_moe(cfg)

    # ---- specialization losses (the SpecializationConfig checks its own fields)
    if s.enabled and not m.is_moe:
        raise _err("specialization", "the specialization losses and metrics need an MoE model; set "
                   "model.num_moe_experts or set the specialization coefficients to 0 and metrics: false")
    if s.sp_coeff > 0 and not m.swiglu:
        raise _err("specialization.sp_coeff",
                   "R_sp is defined on the SwiGLU intermediate of each expert but model.swiglu is false; "
                   "set model.swiglu: true or specialization.sp_coeff: 0")
    if s.ortho_coeff > 0 and not m.swiglu:
        raise _err("specialization.ortho_coeff",
                   "L_o uses the same per-token expert activation capture as R_sp, which needs the "
                   "gated (SwiGLU) expert MLP, but model.swiglu is false; set model.swiglu: true or "
                   "specialization.ortho_coeff: 0")
    if s.cp_coeff > 0 and len(m.moe_layer_indices) < 2:
        where = ("E in model.hybrid_layer_pattern" if m.is_hybrid
                 else "model.num_layers / model.moe_layer_freq")
        raise _err("specialization.cp_coeff",
                   f"R_cp couples adjacent MoE layers but the model has {len(m.moe_layer_indices)} MoE "
                   f"layer(s); use at least two MoE layers ({where}) or set specialization.cp_coeff: 0")

    # ---- parallel
    if p.sp and p.tp == 1:
        raise _err("parallel.sp", "sequence parallel needs tensor parallel (Megatron refuses sp with "
                   "tp=1); set parallel.sp: false or parallel.tp > 1")
    if p.tp > 1 and m.is_moe and not p.sp:
        raise _err("parallel.sp", f"tp={p.tp} with MoE layers needs sequence parallel (megatron-core's "
                   f"MoELayer refuses to train with tp > 1 and sp off); set parallel.sp: true")
    if m.num_attention_heads % p.tp != 0:
        raise _err("parallel.tp", f"tp={p.tp} does not divide model.num_attention_heads "
                   f"{m.num_attention_heads}; use a tp that divides the head count")
    if groups % p.tp != 0 and p.tp % groups != 0:
        raise _err("parallel.tp", f"tp={p.tp} and model.num_query_groups {groups}: one must divide the "
                   f"other (Megatron's rule); change parallel.tp or model.num_query_groups")
    if m.resolved_ffn_hidden_size % p.tp != 0:
        raise _err("parallel.tp", f"tp={p.tp} does not divide the dense FFN width "
                   f"{m.resolved_ffn_hidden_size} (model.ffn_hidden_size); change one of them")
    if m.is_moe and p.resolved_etp != p.tp and p.ep == 1:
        # megatron-core marks expert weights as expert-parallel (allreduce=False) only when ep > 1;
        # with ep=1 DDP averages the different ETP shards over the data-parallel group (checked on
        # megatron-core 0.16.1: tests/test_megatron_parity.py, docs/parallelism.md).
        raise _err("parallel.etp", f"etp={p.resolved_etp} differs from tp={p.tp} with ep=1: megatron-core then "
                   "all-reduces the expert weight shards as if they were dense weights, which corrupts "
                   "their gradients; use ep > 1 with etp != tp, or leave etp unset (= tp)")
    if m.is_hybrid:
        pass  # the pattern's | segments place the stages (_check_hybrid)
    elif m.num_layers % p.pp != 0:
        raise _err("parallel.pp", f"pp={p.pp} does not divide model.num_layers {m.num_layers} "
                   f"(uneven pipeline stages are not supported here); change parallel.pp or num_layers")
    elif p.vpp is not None:
        if p.pp == 1:
            raise _err("parallel.vpp", "the interleaved schedule needs pp > 1; set parallel.vpp: null "
                       "or parallel.pp > 1")
        if (m.num_layers // p.pp) % p.vpp != 0:
            raise _err("parallel.vpp", f"vpp={p.vpp} does not divide the {m.num_layers // p.pp} layers "
                       f"per pipeline stage; choose a divisor")
    if p.cp > 1 and m.seq_length % (2 * p.cp) != 0:
        raise _err("parallel.cp", f"context parallel splits each sequence into 2*cp chunks: "
                   f"model.seq_length {m.seq_length} must be divisible by {2 * p.cp}")

    # ---- training
    if t.global_batch_size is not None and t.global_batch_size % t.micro_batch_size != 0:
        raise _err("training.global_batch_size",
                   f"{t.global_batch_size} is not divisible by training.micro_batch_size "
                   f"{t.micro_batch_size}; make it a multiple of micro_batch_size * dp")
    if t.min_lr > t.lr:
        raise _err("training.min_lr", f"{t.min_lr} is larger than training.lr {t.lr}; lower min_lr")
    decay_iters = t.lr_decay_iters if t.lr_decay_iters is not None else t.train_iters
    if t.lr_warmup_iters >= decay_iters:
        raise _err("training.lr_warmup_iters", f"{t.lr_warmup_iters} warm-up steps must be fewer than the "
                   f"{decay_iters} decay steps (training.lr_decay_iters, null = train_iters; megatron-core's "
                   f"scheduler asserts it); lower it")
    for name in ("adam_beta1", "adam_beta2"):
        if not getattr(t, name) < 1:
            raise _err(f"training.{name}", f"must be < 1, got {getattr(t, name)}")
    _check_recompute(cfg)

    # ---- data
    _check_data(cfg, check_paths)

    # ---- checkpoint
    r = cfg.checkpoint.resume
    if r not in ("auto", "none") and check_paths and not os.path.isdir(r):
        raise _err("checkpoint.resume", f"checkpoint directory {r!r} does not exist; give an existing "
                   f"checkpoint directory, or auto / none")


def installed_megatron_core_version() -> Optional[str]:
    """The installed megatron-core version, read from its distribution metadata (megatron is not
    imported); None when it is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def hybrid_model_available() -> bool:
    """The installed megatron-core has HybridModel (>= 0.19; model.hybrid_layer_pattern is accepted)."""
    version = installed_megatron_core_version()
    return version is not None and _major_minor(version) >= _major_minor(HYBRID_MIN_MEGATRON_CORE)


def _major_minor(version: str) -> Tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


_KEY_HYBRID = "model.hybrid_layer_pattern"


def _check_hybrid_pattern(m: "ModelConfig") -> None:
    """model.hybrid_layer_pattern on its own: type, symbols, the megatron-core version; then fills in
    a null model.num_layers from it. Runs before the field checks (num_layers is required)."""
    pattern = m.hybrid_layer_pattern
    if pattern is None:
        return
    if not isinstance(pattern, str):
        raise _err(_KEY_HYBRID, f"must be a string of layer symbols (e.g. \"*-*E*E\"; quote it in YAML), "
                   f"got {pattern!r} ({type(pattern).__name__})")
    if HYBRID_MTP in pattern:
        raise _err(_KEY_HYBRID, f"{pattern!r}: multi-token prediction ('/' and an MTP pattern) is not "
                   f"supported by this driver; remove the '/...' part")
    known = {HYBRID_ATTENTION, HYBRID_MLP, HYBRID_MOE, HYBRID_PIPE, *HYBRID_GPU_ONLY}
    for i, c in enumerate(pattern):
        if c == "+" or c == "D":
            raise _err(_KEY_HYBRID, f"{pattern!r}: {'MLA' if c == '+' else 'DeepSeek sparse attention'} "
                       f"layers ({c!r}) need megatron's multi-latent attention options, which this run "
                       f"configuration does not have; use * (attention)")
        if c not in known:
            raise _err(_KEY_HYBRID, f"{pattern!r}: {c!r} (position {i}) is not a layer symbol; use * "
                       f"(attention), - (dense MLP), E (MoE), M (Mamba), G (gated delta net), and | "
                       f"between pipeline stages")
    symbols = pattern.replace(HYBRID_PIPE, "")
    if not symbols:
        raise _err(_KEY_HYBRID, f"{pattern!r} has no layer; give one symbol per layer, e.g. \"*E*E\"")
    version = installed_megatron_core_version()
    if version is not None and _major_minor(version) < _major_minor(HYBRID_MIN_MEGATRON_CORE):
        raise _err(_KEY_HYBRID, f"HybridModel needs megatron-core >= {HYBRID_MIN_MEGATRON_CORE}; this "
                   f"environment has {version}. Upgrade (pip install "
                   f"'megatron-core>=0.19,<0.20'), or build the GPTModel equivalent: remove "
                   f"model.hybrid_layer_pattern and set model.num_layers and model.moe_layer_freq "
                   f"(\"*E*E\" is num_layers: 2, moe_layer_freq: 1)")
    gpu_only = sorted({c for c in symbols if c in HYBRID_GPU_ONLY})
    if gpu_only:
        # The core's rule (names the missing kernel); imports megatron, only for these patterns.
        from megatron_moe_spec.core.hybrid import check_hybrid_pattern

        try:
            check_hybrid_pattern(pattern)
        except (ValueError, ImportError, NotImplementedError) as e:
            raise _err(_KEY_HYBRID, str(e)) from None
    if m.num_layers is None:
        m.num_layers = len(symbols)


def _check_hybrid(cfg: RunConfig) -> None:
    """model.hybrid_layer_pattern against the other keys, as megatron-core / Megatron-LM require."""
    m, p = cfg.model, cfg.parallel
    pattern, symbols = m.hybrid_layer_pattern, m.hybrid_layer_symbols
    if m.num_layers != len(symbols):
        raise _err("model.num_layers", f"{m.num_layers} differs from the {len(symbols)} layers of "
                   f"model.hybrid_layer_pattern {pattern!r} (one per symbol, | excluded); set "
                   f"num_layers: {len(symbols)} or null (derived from the pattern)")
    n_moe = symbols.count(HYBRID_MOE)
    if n_moe and not m.is_moe:
        raise _err("model.num_moe_experts", f"model.hybrid_layer_pattern {pattern!r} has {n_moe} MoE "
                   f"layer(s) (E) but num_moe_experts is null; set the number of experts")
    if m.is_moe and not n_moe:
        raise _err(_KEY_HYBRID, f"{pattern!r} has no MoE layer (E) but model.num_moe_experts is set; put "
                   f"an E where a layer is MoE, or set num_moe_experts: null")
    freq = m.moe_layer_freq
    if not (freq == 1 or freq == m.moe_layer_pattern):
        raise _err("model.moe_layer_freq", f"{freq} is not used by HybridModel: the E symbols of "
                   f"model.hybrid_layer_pattern place the MoE layers; remove moe_layer_freq (default 1)")
    segments = m.hybrid_segments
    if len(segments) > 1:
        if p.pp == 1:
            raise _err(_KEY_HYBRID, f"{pattern!r}: | splits pipeline stages but parallel.pp is 1; remove "
                       f"the | or set parallel.pp (the number of segments divided by the virtual stages)")
        empty = [i for i, seg in enumerate(segments) if not seg]
        if empty:
            raise _err(_KEY_HYBRID, f"{pattern!r}: pipeline segment {empty[0]} is empty; put at least one "
                       f"layer between two |")
        if len(segments) % p.pp != 0:
            raise _err("parallel.pp", f"pp={p.pp} does not divide the {len(segments)} pipeline segments of "
                       f"model.hybrid_layer_pattern {pattern!r} (megatron's rule); change pp or the | ")
        vpp = len(segments) // p.pp if len(segments) > p.pp else None
        if p.vpp != vpp:
            raise _err("parallel.vpp", f"{p.vpp}, but the {len(segments)} segments of "
                       f"model.hybrid_layer_pattern over pp={p.pp} make vpp {vpp} (Megatron-LM derives it "
                       f"from the pattern); set parallel.vpp: {'null' if vpp is None else vpp}")
    elif p.pp > 1:
        half = len(symbols) // 2
        raise _err(_KEY_HYBRID, f"{pattern!r} has no | but parallel.pp is {p.pp}: mark the pipeline stage "
                   f"boundaries with | (megatron deprecates the split without them), e.g. "
                   f"{symbols[:half]!r} + '|' + {symbols[half:]!r} for pp 2")
    elif p.vpp is not None:
        raise _err("parallel.vpp", "virtual pipeline stages of a HybridModel are the | segments of "
                   "model.hybrid_layer_pattern; set parallel.vpp: null")


def _check_moe(cfg: RunConfig) -> None:
    m, p = cfg.model, cfg.parallel
    E, k = m.num_moe_experts, m.moe_router_topk
    if k > E:
        raise _err("model.moe_router_topk", f"top-{k} of {E} experts is impossible; set moe_router_topk "
                   f"<= model.num_moe_experts")
    if isinstance(m.moe_layer_freq, int):
        if m.moe_layer_freq < 1:
            raise _err("model.moe_layer_freq", f"must be >= 1 (one MoE layer every N layers), got "
                       f"{m.moe_layer_freq}")
    else:
        if len(m.moe_layer_freq) != m.num_layers or any(v not in (0, 1) for v in m.moe_layer_freq):
            raise _err("model.moe_layer_freq", f"a list must hold one 0 (dense) or 1 (MoE) per layer, "
                       f"{m.num_layers} entries (model.num_layers); got {m.moe_layer_freq}")
        if not any(m.moe_layer_freq):
            raise _err("model.moe_layer_freq", "has no MoE layer (all 0); put a 1 where a layer is MoE")
    if m.moe_token_dispatcher_type == "flex":
        raise _err("model.moe_token_dispatcher_type",
                   "flex (DeepEP / HybridEP) is not supported by megatron-moe-spec: it needs those CUDA "
                   "libraries and the specialization losses hook the allgather and alltoall dispatchers "
                   "only; use alltoall (recommended with ep > 1) or allgather")
    if E % p.ep != 0:
        raise _err("parallel.ep", f"ep={p.ep} does not divide model.num_moe_experts {E}; every EP rank "
                   f"holds the same number of experts: choose ep dividing {E}")
    etp = p.resolved_etp
    F = m.resolved_moe_ffn_hidden_size
    if F % etp != 0:
        raise _err("parallel.etp", f"etp={etp} does not divide the expert width {F} "
                   f"(model.moe_ffn_hidden_size); change parallel.etp or moe_ffn_hidden_size")
    if m.moe_shared_expert_intermediate_size is not None and m.moe_shared_expert_intermediate_size % p.tp:
        raise _err("parallel.tp", f"tp={p.tp} does not divide model.moe_shared_expert_intermediate_size "
                   f"{m.moe_shared_expert_intermediate_size}; change one of them")
    if m.add_bias_linear and m.moe_shared_expert_intermediate_size is not None:
        raise _err("model.add_bias_linear", "megatron-core's shared expert has no biases; set "
                   "model.add_bias_linear: false or remove the shared expert")
    if m.add_bias_linear and etp != 1:
        raise _err("parallel.etp", "megatron-core supports biases in MoE experts only with etp=1; set "
                   "parallel.etp: 1 or model.add_bias_linear: false")
    # router
    lb = m.moe_router_load_balancing_type
    lb_list = lb if isinstance(lb, list) else [lb]
    for v in lb_list:
        if v not in LB_TYPES:
            raise _err("model.moe_router_load_balancing_type",
                       f"{v!r} is not one of {', '.join(LB_TYPES)}{_suggest(str(v), LB_TYPES)}")
    coeff = m.moe_aux_loss_coeff
    if isinstance(lb, list):
        if not isinstance(coeff, list) or len(coeff) != len(lb):
            raise _err("model.moe_aux_loss_coeff", f"moe_router_load_balancing_type is a list of {len(lb)}; "
                       f"give a list of {len(lb)} coefficients here too")
    elif isinstance(coeff, list):
        raise _err("model.moe_aux_loss_coeff", "is a list but moe_router_load_balancing_type is a single "
                   "type; give one number, or a list of types")
    if any(c < 0 for c in (coeff if isinstance(coeff, list) else [coeff])):
        raise _err("model.moe_aux_loss_coeff", f"must be >= 0, got {coeff}")
    if "sinkhorn" in lb_list and any(c != 0 for c in (coeff if isinstance(coeff, list) else [coeff])):
        raise _err("model.moe_aux_loss_coeff", "sinkhorn routing does not support an auxiliary loss "
                   "(megatron-core asserts moe_aux_loss_coeff == 0); set it to 0 or use aux_loss")
    if (k == 1 and m.moe_router_score_function == "softmax" and not m.moe_router_pre_softmax
            and lb != "sinkhorn"):
        raise _err("model.moe_router_pre_softmax", "top-1 routing with softmax needs the softmax before "
                   "top-k (a softmax over one logit has no gradient); set model.moe_router_pre_softmax: true")
    if m.moe_router_enable_expert_bias and m.moe_router_score_function != "sigmoid":
        raise _err("model.moe_router_enable_expert_bias", "the aux-loss-free expert bias works with the "
                   "sigmoid score function only; set model.moe_router_score_function: sigmoid")
    ng, gk = m.moe_router_num_groups, m.moe_router_group_topk
    if (ng is None) != (gk is None):
        missing = "moe_router_group_topk" if gk is None else "moe_router_num_groups"
        raise _err(f"model.{missing}", "group-limited routing needs both model.moe_router_num_groups and "
                   "model.moe_router_group_topk; set both or neither")
    if ng is not None:
        if E % ng != 0:
            raise _err("model.moe_router_num_groups", f"{ng} groups do not divide the {E} experts; "
                       f"choose a divisor of model.num_moe_experts")
        if gk > ng:
            raise _err("model.moe_router_group_topk", f"{gk} selected groups > {ng} groups; lower it")
        if k % gk != 0 or k // gk > E // ng:
            raise _err("model.moe_router_group_topk",
                       f"top-{k} must split evenly over {gk} groups of {E // ng} experts; choose "
                       f"moe_router_group_topk dividing moe_router_topk")
    # capacity
    if m.moe_expert_capacity_factor is not None:
        for v in lb_list:
            if v not in _CAPACITY_LB_TYPES:
                raise _err("model.moe_expert_capacity_factor", f"token dropping works with "
                           f"{', '.join(_CAPACITY_LB_TYPES)} load balancing, not {v!r}; change "
                           f"model.moe_router_load_balancing_type or set the capacity factor to null")
    if m.moe_pad_expert_input_to_capacity and m.moe_expert_capacity_factor is None:
        raise _err("model.moe_pad_expert_input_to_capacity", "needs model.moe_expert_capacity_factor; set "
                   "a capacity factor or set this to false")
    # shared expert
    if m.moe_shared_expert_overlap:
        if m.moe_shared_expert_intermediate_size is None:
            raise _err("model.moe_shared_expert_overlap", "there is no shared expert "
                       "(model.moe_shared_expert_intermediate_size is null); set this to false")
        if m.moe_token_dispatcher_type != "alltoall":
            raise _err("model.moe_shared_expert_overlap", "works with the alltoall dispatcher only; set "
                       "model.moe_token_dispatcher_type: alltoall or this to false")
    if m.moe_grouped_gemm is True and m.transformer_impl == "local" and (
            cfg.specialization.sp_coeff > 0 or cfg.specialization.ortho_coeff > 0
            or cfg.specialization.metrics):
        raise _err("model.moe_grouped_gemm", "true with model.transformer_impl: local builds megatron's "
                   "legacy GroupedMLP, which has no linear_fc2 module for R_sp, L_o and the metrics to "
                   "capture the SwiGLU intermediate from; use transformer_impl: transformer_engine "
                   "(TEGroupedMLP), or set moe_grouped_gemm: auto (false with local)")
    if m.moe_shared_expert_gate and m.moe_shared_expert_intermediate_size is None:
        raise _err("model.moe_shared_expert_gate", "there is no shared expert "
                   "(model.moe_shared_expert_intermediate_size is null); set this to false")


def _check_recompute(cfg: RunConfig) -> None:
    t, m = cfg.training, cfg.model
    g = t.recompute_granularity
    if g == "none":
        for name in ("recompute_method", "recompute_num_layers", "recompute_modules"):
            if getattr(t, name) is not None:
                raise _err(f"training.{name}", "is set but training.recompute_granularity is none; set "
                           "recompute_granularity (full or selective) or remove this key")
        return
    if g == "full":
        if t.recompute_method is None:
            raise _err("training.recompute_method", "full recomputation needs a method: uniform or block")
        per_stage = m.num_layers // cfg.parallel.pp
        if m.is_hybrid:  # each model chunk holds one | segment: the shortest bounds the unit
            per_stage = min(len(seg) for seg in m.hybrid_segments)
        if t.recompute_num_layers is None or t.recompute_num_layers > per_stage:
            raise _err("training.recompute_num_layers", f"full recomputation needs an integer between 1 and "
                       f"the {per_stage} layers per pipeline stage, got {t.recompute_num_layers}")
        if t.recompute_modules is not None:
            raise _err("training.recompute_modules", "only applies to selective recomputation; remove it "
                       "or set training.recompute_granularity: selective")
        return
    # selective
    for name in ("recompute_method", "recompute_num_layers"):
        if getattr(t, name) is not None:
            raise _err(f"training.{name}", "must be null with selective recomputation (it recomputes "
                       "recompute_modules in every layer); remove it")
    mods = t.recompute_modules if t.recompute_modules is not None else ["core_attn"]
    for mod in mods:
        if mod not in RECOMPUTE_MODULES:
            raise _err("training.recompute_modules", f"{mod!r} is not one of {', '.join(RECOMPUTE_MODULES)}"
                       f"{_suggest(mod, RECOMPUTE_MODULES)}")
    if "moe_act" in mods and m.moe_grouped_gemm is False:
        raise _err("training.recompute_modules", "moe_act recompute needs model.moe_grouped_gemm: true; "
                   "use moe instead, or enable grouped GEMM (GPU)")
    if "mla_up_proj" in mods:
        raise _err("training.recompute_modules", "mla_up_proj needs multi-latent attention, which these "
                   "configs do not use; remove it")
    if "shared_experts" in mods and m.moe_shared_expert_overlap:
        raise _err("training.recompute_modules", "shared_experts recompute does not work with "
                   "model.moe_shared_expert_overlap; remove one of them")
    if ("moe" in mods or "moe_act" in mods or "shared_experts" in mods) and not m.is_moe:
        raise _err("training.recompute_modules", "MoE modules listed but the model is dense; remove them")


def _check_data(cfg: RunConfig, check_paths: bool) -> None:
    d = cfg.data
    parts = d.split.replace("/", ",").split(",")
    try:
        nums = [float(x) for x in parts]
    except ValueError:
        nums = None
    if nums is None or len(nums) != 3 or any(n < 0 for n in nums) or sum(nums) <= 0 or nums[0] <= 0:
        raise _err("data.split", f"must be three non-negative train,valid,test weights with train > 0, "
                   f"e.g. \"969,30,1\"; got {d.split!r}")
    if d.weights is not None:
        if len(d.weights) != len(d.paths):
            raise _err("data.weights", f"{len(d.weights)} weights for {len(d.paths)} paths; give one per "
                       f"path or null")
        if any(w < 0 for w in d.weights) or sum(d.weights) <= 0:
            raise _err("data.weights", "must be non-negative with a positive sum")
    if d.type == "mock":
        if d.paths:
            raise _err("data.paths", "is set but data.type is mock (synthetic tokens, no files); set "
                       "data.type: indexed or remove data.paths")
        return
    # indexed
    if not d.paths:
        raise _err("data.paths", "data.type indexed needs at least one dataset prefix (PREFIX.bin / "
                   "PREFIX.idx); set data.paths or use data.type: mock")
    if d.tokenizer_path is None:
        raise _err("data.tokenizer_path", "data.type indexed needs the tokenizer the data was built with; "
                   "set data.tokenizer_path")
    if check_paths:
        for i, prefix in enumerate(d.paths):
            missing = _missing_dataset_files(prefix)
            if missing:
                raise _err(f"data.paths[{i}]", f"missing data path: {', '.join(missing)} not found (cwd "
                           f"{os.getcwd()}); build the dataset first (scripts/prepare_data.sh DIR, then use "
                           f"DIR/indexed/corpus; see prepare-data) or fix the prefix (without .bin/.idx)")
        if not os.path.exists(d.tokenizer_path):
            raise _err("data.tokenizer_path", f"missing data path: tokenizer {d.tokenizer_path!r} not found "
                       f"(cwd {os.getcwd()}); fix the path")


def _missing_dataset_files(prefix: str) -> List[str]:
    """The files a dataset prefix lacks: none when PREFIX.bin/.idx exist, or when it is a prepared
    corpus prefix (PREFIX_train_text_document.bin/.idx, docs/data.md); else PREFIX.bin/.idx."""
    plain = [prefix + ext for ext in (".bin", ".idx")]
    corpus = [f"{prefix}_train_text_document{ext}" for ext in (".bin", ".idx")]
    if all(os.path.isfile(f) for f in corpus):
        return []
    return [f for f in plain if not os.path.isfile(f)]


# ====================================================================== world size
@dataclass(frozen=True)
class ParallelSizes:
    """Everything that depends on the world size (Megatron's process-group arithmetic)."""

    world_size: int
    tp: int
    pp: int
    cp: int
    vpp: Optional[int]
    dp: int
    ep: int
    etp: int
    expert_dp: int
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int


def validate_for_world_size(cfg: RunConfig, world_size: int) -> ParallelSizes:
    """The checks that need the number of processes; returns the derived sizes."""
    p, t = cfg.parallel, cfg.training
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size must be a positive integer, got {world_size!r}", key="world_size")
    model_size = p.tp * p.pp * p.cp
    if world_size % model_size != 0:
        raise _err("parallel", f"world size {world_size} is not divisible by tp*pp*cp = "
                   f"{p.tp}*{p.pp}*{p.cp} = {model_size}; launch a multiple of {model_size} processes or "
                   f"change parallel.tp / pp / cp")
    dp = world_size // model_size
    etp = p.resolved_etp
    expert_size = etp * p.ep * p.pp
    if world_size % expert_size != 0:
        raise _err("parallel.ep", f"world size {world_size} is not divisible by etp*ep*pp = "
                   f"{etp}*{p.ep}*{p.pp} = {expert_size} (Megatron's expert process groups); change "
                   f"parallel.ep / etp or the number of processes")
    expert_dp = world_size // expert_size
    gbs = t.global_batch_size if t.global_batch_size is not None else t.micro_batch_size * dp
    if gbs % (t.micro_batch_size * dp) != 0:
        raise _err("training.global_batch_size",
                   f"{gbs} is not divisible by micro_batch_size * dp = {t.micro_batch_size}*{dp} = "
                   f"{t.micro_batch_size * dp} at world size {world_size}; use a multiple of it")
    num_microbatches = gbs // (t.micro_batch_size * dp)
    if p.vpp is not None and num_microbatches % p.pp != 0:
        raise _err("training.global_batch_size",
                   f"the interleaved schedule (parallel.vpp) needs the micro-batches per step, "
                   f"{num_microbatches} = {gbs} / ({t.micro_batch_size}*{dp}), to be a multiple of pp={p.pp} "
                   f"(megatron-core's rule); raise global_batch_size to a multiple of "
                   f"{t.micro_batch_size * dp * p.pp}")
    return ParallelSizes(
        world_size=world_size, tp=p.tp, pp=p.pp, cp=p.cp, vpp=p.vpp, dp=dp, ep=p.ep, etp=etp,
        expert_dp=expert_dp, micro_batch_size=t.micro_batch_size, global_batch_size=gbs,
        num_microbatches=num_microbatches)


# ====================================================================== megatron-core kwargs
def _resolve_cpu(cfg: RunConfig, cpu: Optional[bool]) -> bool:
    if cpu is not None:
        return bool(cpu)
    if cfg.training.device == "cpu":
        return True
    if cfg.training.device == "cuda":
        return False
    import torch

    return not torch.cuda.is_available()


def transformer_engine_importable() -> bool:
    """Transformer Engine's PyTorch extension imports here (False on a broken CUDA install too)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _module_importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(cfg: RunConfig, cpu: Optional[bool] = None) -> Tuple[str, bool]:
    """``(transformer_impl, moe_grouped_gemm)`` with ``auto`` resolved for this machine.

    ``transformer_impl: auto`` is transformer_engine on a CUDA run (``cpu`` False; None = from
    ``training.device``) when Transformer Engine imports, else local. ``moe_grouped_gemm: auto`` is
    true exactly when the implementation is transformer_engine (TEGroupedMLP)."""
    m = cfg.model
    impl = m.transformer_impl
    if impl == "auto":
        cpu = _resolve_cpu(cfg, cpu)
        impl = "transformer_engine" if not cpu and transformer_engine_importable() else "local"
    grouped = m.moe_grouped_gemm
    if grouped == "auto":
        grouped = impl == "transformer_engine"
    return impl, bool(grouped)


def megatron_config_kwargs(cfg: RunConfig, cpu: Optional[bool] = None) -> dict:
    """The kwargs of megatron-core's ``TransformerConfig`` for this run.

    ``cpu=True``: CPU-safe options (``use_cpu_initialization``, every fusion off).
    ``cpu=False``: the GPU options Megatron-LM uses by default (bias-activation, masked-softmax,
    bias-dropout and gradient-accumulation fusions; RoPE fusion with rope, needs Transformer Engine;
    ``moe_permute_fusion`` as configured). ``cpu=None``: from ``training.device`` (auto = CUDA
    availability). Model-shape options are identical in both modes.
    """
    import torch
    import torch.nn.functional as F

    cpu = _resolve_cpu(cfg, cpu)
    m, p, t = cfg.model, cfg.parallel, cfg.training
    impl, grouped_gemm = resolve_backend(cfg, cpu)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
    kw: Dict[str, Any] = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.resolved_num_query_groups,
        kv_channels=m.resolved_kv_channels,
        ffn_hidden_size=m.resolved_ffn_hidden_size,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        normalization=m.normalization,
        layernorm_epsilon=m.layernorm_epsilon,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        transformer_impl=impl,
        # parallel
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        context_parallel_size=p.cp,
        sequence_parallel=p.sp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.resolved_etp,
        # numerics
        params_dtype=dtype,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        pipeline_dtype=dtype if p.pp > 1 else None,
        calculate_per_token_loss=t.calculate_per_token_loss,
        # recompute
        recompute_granularity=None if t.recompute_granularity == "none" else t.recompute_granularity,
        recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
        recompute_modules=list(t.recompute_modules) if t.recompute_modules is not None else None,
    )
    if m.is_hybrid:
        # As Megatron-LM's core_transformer_config_from_args for --hybrid-layer-pattern (the output
        # layer's init scale); num_layers counts the pattern's symbols.
        kw.update(num_layers=len(m.hybrid_layer_symbols), is_hybrid_model=True)
    if m.is_moe:
        kw.update(
            num_moe_experts=m.num_moe_experts,
            # HybridModel places its MoE layers by the pattern's E and ignores moe_layer_freq; the
            # 0/1 list of those E keeps config-based layer arithmetic (layer_specs.moe_layer_numbers)
            # right for the MoE layers HybridModel builds.
            moe_layer_freq=(list(m.moe_layer_pattern) if m.is_hybrid else copy.deepcopy(m.moe_layer_freq)),
            moe_ffn_hidden_size=m.resolved_moe_ffn_hidden_size,
            moe_router_topk=m.moe_router_topk,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=m.moe_shared_expert_gate,
            moe_shared_expert_overlap=m.moe_shared_expert_overlap,
            moe_router_score_function=m.moe_router_score_function,
            moe_router_pre_softmax=m.moe_router_pre_softmax,
            moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
            moe_router_num_groups=m.moe_router_num_groups,
            moe_router_group_topk=m.moe_router_group_topk,
            moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=m.moe_router_bias_update_rate,
            moe_router_dtype=m.moe_router_dtype,
            moe_router_load_balancing_type=copy.deepcopy(m.moe_router_load_balancing_type),
            moe_aux_loss_coeff=copy.deepcopy(m.moe_aux_loss_coeff),
            moe_z_loss_coeff=m.moe_z_loss_coeff,
            moe_input_jitter_eps=m.moe_input_jitter_eps,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            moe_expert_capacity_factor=m.moe_expert_capacity_factor,
            moe_pad_expert_input_to_capacity=m.moe_pad_expert_input_to_capacity,
            moe_token_drop_policy=m.moe_token_drop_policy,
            moe_grouped_gemm=grouped_gemm,
        )
    if cpu:
        kw.update(
            use_cpu_initialization=True,
            gradient_accumulation_fusion=False,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            bias_dropout_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
            moe_permute_fusion=False,
        )
    else:
        # bias_activation_fusion: megatron-core accepts it for SwiGLU, and for GeLU only with biases.
        # gradient_accumulation_fusion and apply_rope_fusion need Transformer Engine kernels (or apex
        # for the former): on with transformer_impl: transformer_engine only.
        # masked_softmax_fusion (local attention) imports apex's scaled_masked_softmax_cuda kernels,
        # and persist_layer_norm needs apex's FusedLayerNorm (megatron's torch fallback norm asserts
        # it is off): on only where those import, so that the local spec runs on a plain CUDA torch.
        te = impl == "transformer_engine"
        softmax_kernels = all(_module_importable(n) for n in (
            "scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"))
        kw.update(
            use_cpu_initialization=False,
            gradient_accumulation_fusion=te,
            bias_activation_fusion=m.swiglu or m.add_bias_linear,
            masked_softmax_fusion=te or softmax_kernels,
            bias_dropout_fusion=True,
            persist_layer_norm=te or _module_importable("apex"),
            apply_rope_fusion=te and m.position_embedding_type == "rope",
            moe_permute_fusion=m.moe_permute_fusion if m.is_moe else False,
        )
    return kw


def gpt_model_kwargs(cfg: RunConfig) -> dict:
    """The ``GPTModel`` kwargs beside ``config`` and ``transformer_layer_spec``."""
    m = cfg.model
    return dict(
        vocab_size=padded_vocab_size(cfg),
        max_sequence_length=m.max_position_embeddings or m.seq_length,
        position_embedding_type=m.position_embedding_type,
        rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        parallel_output=True,
    )


def hybrid_model_kwargs(cfg: RunConfig) -> dict:
    """The ``HybridModel`` kwargs beside ``config`` and ``hybrid_stack_spec`` (a config with
    ``model.hybrid_layer_pattern``): ``gpt_model_kwargs`` plus the pattern."""
    if not cfg.model.is_hybrid:
        raise ValueError("hybrid_model_kwargs: model.hybrid_layer_pattern is null (a GPTModel config); "
                         "use gpt_model_kwargs")
    return dict(gpt_model_kwargs(cfg), hybrid_layer_pattern=cfg.model.hybrid_layer_pattern)


def optimizer_config_kwargs(cfg: RunConfig) -> dict:
    """The kwargs of megatron-core's ``OptimizerConfig`` (the schedule stays with the driver)."""
    import torch

    t = cfg.training
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
    return dict(
        optimizer=t.optimizer,
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        params_dtype=dtype,
        use_distributed_optimizer=t.use_distributed_optimizer,
    )


def lr_scheduler_kwargs(cfg: RunConfig) -> dict:
    """The kwargs of megatron-core's ``OptimizerParamScheduler`` (besides ``optimizer``), in
    iterations: call ``scheduler.step(increment=1)`` once per optimizer step."""
    t = cfg.training
    return dict(
        init_lr=0.0 if t.lr_warmup_iters > 0 else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=t.lr_decay_iters if t.lr_decay_iters is not None else t.train_iters,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
    )


def padded_vocab_size(cfg: RunConfig) -> int:
    """Megatron-LM's padding: the next multiple of make_vocab_size_divisible_by * tp."""
    mult = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tp
    return int(math.ceil(cfg.model.vocab_size / mult) * mult)


# ====================================================================== parameter count
@dataclass(frozen=True)
class ParamCount:
    total: int
    """All parameters (embeddings and output layer included)."""
    active: int
    """Parameters a token uses: everything but the routed experts it is not sent to."""
    embedding: int
    """Input embedding + output layer (+ learned positions)."""
    routed_experts: int
    """All routed expert parameters (the part that is sparse)."""

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def count_parameters(cfg: RunConfig) -> ParamCount:
    """Exact parameter count of the GPT model this config builds (megatron-core layout, bias and
    norm parameters included; the expert bias is a buffer, not a parameter)."""
    m = cfg.model
    H = m.hidden_size
    V = padded_vocab_size(cfg)
    glu = 2 if m.swiglu else 1
    bias = m.add_bias_linear
    norm = 2 * H if m.normalization == "LayerNorm" else H

    def mlp(width: int) -> int:
        n = H * width * glu + width * H
        if bias:
            n += width * glu + H
        return n

    kv = m.resolved_kv_channels
    q_out = m.num_attention_heads * kv
    kv_out = 2 * m.resolved_num_query_groups * kv
    attn = H * (q_out + kv_out) + q_out * H
    if bias or m.add_qkv_bias:
        attn += q_out + kv_out
    if bias:
        attn += H
    if m.qk_layernorm:
        attn += 2 * (2 * kv if m.normalization == "LayerNorm" else kv)

    if m.is_hybrid:
        # HybridModel: '*' is a layer of input norm + attention, '-' pre-MLP norm + MLP, 'E' pre-MLP
        # norm + MoE (a GPT layer is the pair *- or *E).
        unknown = sorted({c for c in m.hybrid_layer_symbols if c not in (HYBRID_ATTENTION, HYBRID_MLP, HYBRID_MOE)})
        if unknown:
            raise ValueError(f"count_parameters: model.hybrid_layer_pattern has {', '.join(unknown)} layers; "
                             f"only *, - and E are counted")
        kinds = [(c == HYBRID_ATTENTION, c == HYBRID_MLP, c == HYBRID_MOE) for c in m.hybrid_layer_symbols]
    else:
        kinds = [(True, not is_moe, bool(is_moe)) for is_moe in m.moe_layer_pattern]

    total = active = routed = 0
    for has_attn, has_mlp, is_moe in kinds:
        common = (attn + norm if has_attn else 0) + (norm if has_mlp or is_moe else 0)
        total += common
        active += common
        if has_mlp:
            n = mlp(m.resolved_ffn_hidden_size)
            total += n
            active += n
            continue
        if not is_moe:
            continue
        E, k = m.num_moe_experts, m.moe_router_topk
        router = H * E + (E if bias else 0)
        expert = mlp(m.resolved_moe_ffn_hidden_size)
        shared = 0
        if m.moe_shared_expert_intermediate_size is not None:
            shared = mlp(m.moe_shared_expert_intermediate_size)
            if m.moe_shared_expert_gate:
                shared += H
        total += router + E * expert + shared
        active += router + k * expert + shared
        routed += E * expert
    final_norm = norm
    emb = V * H
    if m.untie_embeddings_and_output_weights:
        emb += V * H
    if m.position_embedding_type == "learned_absolute":
        emb += (m.max_position_embeddings or m.seq_length) * H
    total += final_norm + emb
    active += final_norm + emb
    return ParamCount(total=total, active=active, embedding=emb, routed_experts=routed)


# ====================================================================== warnings
def config_warnings(cfg: RunConfig) -> List[str]:
    """Valid but noteworthy settings (the CLI prints them; the driver logs them at start-up)."""
    m, p, t, s = cfg.model, cfg.parallel, cfg.training, cfg.specialization
    out = []
    if s.sp_coeff > 0 and m.is_moe and m.moe_router_topk == 1:
        out.append("specialization.sp_coeff: with moe_router_topk 1 no two experts share a token, so "
                   "R_sp is 0 (not an error)")
    if s.ortho_coeff > 0 and m.is_moe and m.moe_router_topk == 1:
        out.append("specialization.ortho_coeff: with moe_router_topk 1, L_o is 0 (not an error)")
    if s.cp_coeff > 0 and p.pp > 1 and s.cp_pipeline == "skip":
        out.append("specialization.cp_pipeline: skip with pp > 1: R_cp pairs split across pipeline "
                   "stages are left out (the driver names them at start-up)")
    if t.device == "cpu":
        if t.precision != "fp32":
            out.append(f"training.precision: {t.precision} on CPU is slow and not what the CPU tests "
                       f"use; the driver decides whether to run it")
        if m.transformer_impl == "transformer_engine":
            out.append("model.transformer_impl: transformer_engine needs a GPU; use local on CPU")
        if m.moe_grouped_gemm is True:
            out.append("model.moe_grouped_gemm needs a GPU (TE or grouped_gemm); it does not run on CPU")
        if p.cp > 1:
            out.append("parallel.cp > 1 does not run on CPU (local attention supports cp == 1 only)")
    if m.is_moe and m.num_moe_experts >= 32 and m.moe_router_dtype is None:
        out.append("model.moe_router_dtype: >= 32 experts without fp32 routing (megatron-core "
                   "recommends moe_router_dtype: fp32)")
    return out


# ====================================================================== reference docs
_SPECIALIZATION_HELP = {
    "sp_coeff": "lambda_sp, intra-layer specialization loss R_sp (paper: 2e-3). Needs model.swiglu.",
    "cp_coeff": "lambda_cp, cross-layer coupling loss R_cp (paper: 1e-3). Needs >= 2 MoE layers.",
    "ortho_coeff": "lambda_o, orthogonality loss L_o of arXiv 2505.22323 (baseline). Needs model.swiglu.",
    "var_coeff": "lambda_v, router variance loss L_v of arXiv 2505.22323 (baseline).",
    "sp_similarity": "R_sp pair similarity: squared_cosine or abs_cosine.",
    "sp_max_tokens": "Evaluate R_sp and L_o on an evenly strided subset (by global position, the offset rotating "
                     "with the step) of at most this many valid tokens per micro-batch; under EP with the alltoall "
                     "dispatcher only those tokens' rows travel (docs/parallelism.md); null = all tokens.",
    "cp_form": "R_cp form: product (-mean M^l M^l') or log (-mean log(M^l M^l' + 1e-9)).",
    "cp_pipeline": "MoE pairs split across pipeline stages: exact (the top-k mass, validity and top-1 travel "
                   "forward, 3T values, and dR/dM back, T values, per pair and micro-batch) or skip (left out, "
                   "with a start-up warning naming them).",
    "v_form": "L_v form: paper (variance over tokens of each expert's gate) or per_token.",
    "eps": "eps of the cosine / projection denominators (fp32).",
    "metrics": "Compute and log the routing metrics (no gradient).",
    "metrics_interval": "Compute the metrics every this many iterations.",
}


_STR_TYPES = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
              "Optional[int]": "an integer or null"}
_SPECIALIZATION_TYPES = {
    "sp_similarity": "squared_cosine \\| abs_cosine",
    "cp_form": "product \\| log",
    "cp_pipeline": "exact \\| skip",
    "v_form": "paper \\| per_token",
}


def _fmt_default(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    return str(value)


def reference_markdown() -> str:
    """One markdown table per section: key, type, default, meaning (docs/configuration.md)."""
    out = []
    for section, cls in SECTIONS.items():
        out.append(f"### `{section}`\n")
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        out.append(doc + "\n")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = _fmt_default(f.default)
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = _fmt_default(f.default_factory())  # type: ignore[misc]
            else:
                default = "-"
            if f.metadata.get("required"):
                default = "**required**"
            if cls is SpecializationConfig:
                # specialization_config.py postpones annotations: f.type is a string there
                help_text = _SPECIALIZATION_HELP.get(f.name, "")
                type_text = _SPECIALIZATION_TYPES.get(f.name) or _STR_TYPES.get(f.type, f.type)
            else:
                help_text = f.metadata.get("help", "")
                type_text = _describe(f.type)
                choices = f.metadata.get("choices")
                if choices:
                    type_text = " \\| ".join(_fmt_default(c) for c in choices)
            out.append(f"| `{f.name}` | {type_text} | {default} | {help_text.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)
