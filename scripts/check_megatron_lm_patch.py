"""CPU smoke check of a PATCHED Megatron-LM checkout (one process, gloo, megatron_moe_spec.cpu).

    cd MEGATRON_LM_DIR   # patched with scripts/apply_megatron_lm_patch.sh
    PYTHONPATH=$PWD:/path/to/megatron-moe-spec python /path/to/megatron-moe-spec/scripts/check_megatron_lm_patch.py

Parses and validates Megatron-LM's arguments with our extra_args_provider, builds a tiny MoE GPT through
the patched model builder (core_v0.16.1 .. core_v0.18.2: gpt_builders.gpt_builder via model_provider;
core_v0.19.0 and main: megatron.training.models.gpt.GPTModelBuilder), runs one forward/backward, then does
what the patched training_log does: track_names, report_coupling_as_pair_mean, log_specialization_metrics,
megatron's tracker report. Exits non-zero if the layers are not the expected ones or the reported
coupling_loss is not the mean over the adjacent MoE pairs.
HYBRID=1: the same through pretrain_hybrid.py's path instead (core_v0.18.0 and later): a HybridModel of
--hybrid-layer-pattern "*E*-*E*E" (MoE layers 1, 5, 7; R_cp pairs (1, 5) across the dense layer, and (5, 7))
with --spec megatron_moe_spec.megatron_lm hybrid_stack_spec (local modules), built through the patched
hybrid_builders.hybrid_builder (core_v0.18.x) or HybridModelBuilder (core_v0.19.0, main); on megatron-core
< 0.19 (core_v0.18.x) the hook must refuse the losses (HybridModel with the losses needs 0.19).
Environment: SPEC_OFF=1 (no --moe-spec-* flags: stock layers expected), USE_SPEC=1 (also pass
--spec megatron_moe_spec.megatron_lm gpt_layer_spec), ALLOW_UNTESTED_CORE=1 (lift megatron-moe-spec's
megatron-core version guard in this process only: Megatron-LM main reports megatron-core 0.20.0, which the
package refuses; this shows whether the patch works there, it does not make 0.20 supported).
Not a GPU test: see docs/megatron_lm.md.
"""
import typing

# Megatron-LM core_v0.19.0 imports typing.override (Python >= 3.12). On 3.11 a no-op stand-in lets
# this check import it; it changes nothing else.
typing.override = getattr(typing, "override", lambda f: f)

import importlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29517")
sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

if os.environ.get("ALLOW_UNTESTED_CORE"):
    import importlib.util

    from packaging.version import Version

    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_moe_spec", "core",
                         "version.py")
    _spec = importlib.util.spec_from_file_location("megatron_moe_spec.core.version", _path)
    _version = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_version)
    _version.SUPPORTED = (_version.SUPPORTED[0], Version("1000"))
    sys.modules["megatron_moe_spec.core.version"] = _version  # used by megatron_moe_spec.core's import check
    print("ALLOW_UNTESTED_CORE: megatron-moe-spec's megatron-core version guard is lifted in this process")

from megatron_moe_spec import cpu  # noqa: E402

cpu.enable()
torch.distributed.init_process_group("gloo", rank=0, world_size=1)

from megatron_moe_spec import megatron_lm as moe_spec  # noqa: E402

UPSTREAM = os.path.isfile(os.path.join("megatron", "training", "models", "gpt.py"))  # core_v0.19.0+ layout

sys.argv = ["pretrain_gpt.py", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
            "--ffn-hidden-size", "128", "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm",
            "--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--num-experts", "4", "--moe-router-topk", "2",
            "--moe-ffn-hidden-size", "64", "--moe-router-load-balancing-type", "aux_loss",
            "--moe-aux-loss-coeff", "1e-2", "--moe-token-dispatcher-type", "alltoall",
            "--transformer-impl", "local", "--no-gradient-accumulation-fusion", "--use-cpu-initialization",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--mock-data", "--lr", "1e-3",
            "--train-iters", "1", "--position-embedding-type", "rope", "--no-masked-softmax-fusion",
            "--no-bias-swiglu-fusion", "--no-rope-fusion", "--no-persist-layer-norm"]
HYBRID = bool(os.environ.get("HYBRID"))
PATTERN = "*E*-*E*E"
if HYBRID:
    assert os.path.isfile("pretrain_hybrid.py"), "HYBRID=1 needs a Megatron-LM with pretrain_hybrid.py (core_v0.18.0+)"
    i = sys.argv.index("--num-layers")
    sys.argv[0] = "pretrain_hybrid.py"
    sys.argv[i:i + 2] = ["--hybrid-layer-pattern", PATTERN, "--spec", "megatron_moe_spec.megatron_lm",
                         "hybrid_stack_spec"]
if not os.environ.get("SPEC_OFF"):
    sys.argv += ["--moe-spec-sp-coeff", "2e-3", "--moe-spec-cp-coeff", "1e-3", "--moe-spec-metrics"]
if os.environ.get("USE_SPEC"):
    sys.argv += ["--spec", "megatron_moe_spec.megatron_lm", "gpt_layer_spec"]

provider = moe_spec.chain_extra_args_provider(None)
defaults = {"tokenizer_type": "GPT2BPETokenizer"}
from megatron.training import arguments  # noqa: E402

if hasattr(arguments, "parse_and_validate_args"):  # core_v0.18.0 and later
    args = arguments.parse_and_validate_args(extra_args_provider=provider, args_defaults=defaults)
else:
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    args = parse_args(provider)
    validate_args(args, defaults)
    set_global_variables(args, build_tokenizer=False)
args.padded_vocab_size = 128
print("args.spec:", args.spec)
print("config:", moe_spec.specialization_config_from_args(args))

import megatron.core  # noqa: E402
from megatron.core import package_info, parallel_state  # noqa: E402

print(f"megatron.core {package_info.__version__} from {os.path.dirname(megatron.core.__file__)}")
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402

parallel_state.initialize_model_parallel()
model_parallel_cuda_manual_seed(1234)


def tracker_view():
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        return {k: (v["values"], v["reduce_group"]) for k, v in get_moe_layer_wise_logging_tracker().items()}
    return {k: (e.values, e.reduce_group) for k, e in get_moe_metrics_tracker().metrics.items()}


def build_through_patch(family, Family):
    """The model as the patched Megatron-LM builds it: ``{Family}ModelBuilder.build_model`` upstream
    (megatron/training/models/{family}.py), else ``model_provider`` with ``{family}_builders.{family}_builder``.
    Returns (model, where it was built)."""
    if UPSTREAM:
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.training import argument_utils

        builder = importlib.import_module(f"megatron.training.models.{family}")
        config = getattr(argument_utils, f"{family}_config_from_args")(args)
        model = getattr(builder, f"{Family}ModelBuilder")(config).build_model(
            ProcessGroupCollection.use_mpu_process_groups(), pre_process=True, post_process=True)
        return model, f"patched {Family}ModelBuilder.build_model"
    from model_provider import model_provider

    builder = getattr(importlib.import_module(f"{family}_builders"), f"{family}_builder")
    return model_provider(builder, pre_process=True, post_process=True), f"patched {family}_builder (model_provider)"


if HYBRID:
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    try:
        model, where = build_through_patch("hybrid", "Hybrid")
    except RuntimeError as e:
        if package_info.__version__ < "0.19" and not os.environ.get("SPEC_OFF") and "needs megatron-core >= 0.19" in str(e):
            print(f"refused, as it must be on megatron-core {package_info.__version__}: {e}")
            print("OK")
            sys.exit(0)
        raise
    assert isinstance(model, HybridModel), type(model)
else:
    model, where = build_through_patch("gpt", "GPT")
kinds = sorted({type(m).__name__ for m in model.modules()
                if type(m).__name__.endswith(("MoELayer", "TransformerLayer"))})
print(f"built through {where}: {kinds}")
print("tracker entries before any forward (name: reduce_group set):",
      {k: g is not None for k, (_, g) in tracker_view().items()})

model.train()
tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
out = model(input_ids=tokens[:, :-1], position_ids=torch.arange(16).expand(2, -1), attention_mask=None,
            labels=tokens[:, 1:])
out.float().mean().backward()

moe_kinds = [k for k in kinds if k.endswith("MoELayer")]
if os.environ.get("SPEC_OFF"):
    assert moe_kinds == ["MoELayer"], kinds
    assert HYBRID or kinds == ["MoELayer", "TransformerLayer"], kinds
else:
    assert moe_kinds == ["SpecializationMoELayer"], kinds
    assert HYBRID or kinds == ["SpecializationMoELayer", "SpecializationTransformerLayer"], kinds


class PrintWriter:
    def add_scalar(self, tag, value, step):
        print(f"  tensorboard {tag} = {value:.4f} (iteration {step})")


# What the patched training_log does, in its order.
names = moe_spec.track_names(args, ["load_balancing_loss"])
print("track_names:", names)
per_layer = {name: tracker_view()[name][0].tolist() for name in names}
for name in names:
    print(f"  {name} per layer: {[round(v, 5) for v in per_layer[name]]}")
moe_spec.report_coupling_as_pair_mean(args)
print("log_specialization_metrics(1):")
moe_spec.log_specialization_metrics(1, PrintWriter(), None)
total = {}
try:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
except ImportError:  # core_v0.16.1, core_v0.17.1
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    track_moe_metrics(loss_scale=1.0, iteration=1, total_loss_dict=total, force_initialize=True,
                      track_names=names, num_layers=args.num_layers, moe_layer_freq=args.moe_layer_freq,
                      mtp_num_layers=args.mtp_num_layers)
else:
    import inspect

    report = get_moe_metrics_tracker().report
    extra = {}
    # What training_log passes: a hybrid model's MoE layers are the E of its pattern (3 here).
    num_layers = PATTERN.count("E") if HYBRID else args.num_layers
    if "num_moe_layers" in inspect.signature(report).parameters:  # main: training_log counts them (no MTP)
        extra["num_moe_layers"] = num_layers
        num_layers = args.num_layers
    else:  # core_v0.18.0 .. core_v0.19.0
        extra["mtp_num_layers"] = args.mtp_num_layers
    report(loss_scale=1.0, iteration=1, total_loss_dict=total, force_initialize=True, track_names=names,
           num_layers=num_layers, moe_layer_freq=args.moe_layer_freq, **extra)
print("megatron's tracker report -> total_loss_dict:", {k: round(float(v), 5) for k, v in total.items()})
if "coupling_loss" in names:
    if HYBRID:  # MoE layers 1, 5, 7 (0-based): pairs (1, 5) and (5, 7), indexed by the earlier layer
        values = per_layer["coupling_loss"]
        pairs = [values[1], values[5]]
        assert all(v != 0 for v in pairs) and all(v == 0 for i, v in enumerate(values) if i not in (1, 5)), values
    else:
        pairs = per_layer["coupling_loss"][:-1]  # 4 MoE layers, one stage: pairs (1,2), (2,3), (3,4)
    n_moe = len(pairs) + 1
    mean = sum(pairs) / len(pairs)
    print(f"coupling_loss: mean over the {len(pairs)} pairs {mean:.5f}, reported {float(total['coupling_loss']):.5f}, "
          f"megatron's mean over {n_moe} MoE layers would be {sum(pairs) / n_moe:.5f}")
    assert abs(float(total["coupling_loss"]) - mean) <= 1e-6 * abs(mean), "coupling_loss is not the mean over pairs"
print("OK")
torch.distributed.destroy_process_group()
