"""The Megatron-LM integration (megatron_moe_spec.megatron_lm and patches/): flags, config, tracker
names, the layer-spec hook, the metrics hook, and the shape of the shipped patches. CPU; Megatron-LM
itself is not needed (its training package is not in the megatron-core wheel)."""
import argparse
import ast
import os
import re
import subprocess
import types

import pytest
import torch

from megatron_moe_spec import megatron_lm
from megatron_moe_spec.specialization_config import SpecializationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH_DIR = os.path.join(ROOT, "patches")

FLAGS = {  # flag -> dest; every default is None ("not given")
    "--moe-spec-config": "moe_spec_config",
    "--moe-spec-sp-coeff": "moe_spec_sp_coeff",
    "--moe-spec-cp-coeff": "moe_spec_cp_coeff",
    "--moe-spec-ortho-coeff": "moe_spec_ortho_coeff",
    "--moe-spec-var-coeff": "moe_spec_var_coeff",
    "--moe-spec-sp-similarity": "moe_spec_sp_similarity",
    "--moe-spec-sp-max-tokens": "moe_spec_sp_max_tokens",
    "--moe-spec-cp-form": "moe_spec_cp_form",
    "--moe-spec-cp-pipeline": "moe_spec_cp_pipeline",
    "--moe-spec-v-form": "moe_spec_v_form",
    "--moe-spec-eps": "moe_spec_eps",
    "--moe-spec-metrics": "moe_spec_metrics",
    "--moe-spec-metrics-interval": "moe_spec_metrics_interval",
}

# The files each patch may touch (and must touch), and the Megatron-LM refs it was checked on
# (docs/megatron_lm.md records the commits and the check of each).
PATCHED_FILES = {
    "megatron-lm-core_v0.16.1-core_v0.17.1.patch": {"pretrain_gpt.py", "gpt_builders.py",
                                                    "megatron/training/training.py"},
    "megatron-lm-core_v0.18.0-core_v0.18.2.patch": {"pretrain_gpt.py", "gpt_builders.py",
                                                    "megatron/training/training.py",
                                                    "pretrain_hybrid.py", "hybrid_builders.py"},
    "megatron-lm-core_v0.19.0-main.patch": {"pretrain_gpt.py", "megatron/training/models/gpt.py",
                                            "megatron/training/training.py",
                                            "pretrain_hybrid.py", "megatron/training/models/hybrid.py"},
}
HYBRID_BUILDER = {"megatron-lm-core_v0.18.0-core_v0.18.2.patch": "hybrid_builders.py",
                  "megatron-lm-core_v0.19.0-main.patch": "megatron/training/models/hybrid.py"}
CHECKED_REFS = {
    "core_v0.16.1": "megatron-lm-core_v0.16.1-core_v0.17.1.patch",
    "core_v0.17.1": "megatron-lm-core_v0.16.1-core_v0.17.1.patch",
    "core_v0.18.0": "megatron-lm-core_v0.18.0-core_v0.18.2.patch",
    "core_v0.18.2": "megatron-lm-core_v0.18.0-core_v0.18.2.patch",
    "core_v0.19.0": "megatron-lm-core_v0.19.0-main.patch",
    "main": "megatron-lm-core_v0.19.0-main.patch",
}


def parser():
    return megatron_lm.add_specialization_args(argparse.ArgumentParser(allow_abbrev=False))


def parse(*argv):
    return parser().parse_args(list(argv))


@pytest.fixture(autouse=True)
def _fresh_state():
    megatron_lm.reset_state()
    yield
    megatron_lm.reset_state()


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


# ------------------------------------------------------------------------------------- flags
def test_provider_adds_exactly_the_flags_with_none_defaults():
    p = parser()
    ours = {opt: a.dest for a in p._actions for opt in a.option_strings if "moe-spec" in opt}
    assert ours == {**FLAGS, "--no-moe-spec-metrics": "moe_spec_metrics"}
    args = p.parse_args([])
    for dest in FLAGS.values():
        assert getattr(args, dest) is None, dest
    # Nothing given = SpecializationConfig's defaults = everything off.
    cfg = megatron_lm.specialization_config_from_args(args)
    assert cfg == SpecializationConfig() and not cfg.enabled


def test_flag_names_follow_the_field_names():
    for field in megatron_lm._FLAGS:
        assert megatron_lm.flag_name(field) in FLAGS
        assert FLAGS[megatron_lm.flag_name(field)] == megatron_lm.dest_name(field)
    import dataclasses
    assert set(megatron_lm._FLAGS) == {f.name for f in dataclasses.fields(SpecializationConfig)}


def test_every_flag_parses_to_the_config():
    args = parse("--moe-spec-sp-coeff", "2e-3", "--moe-spec-cp-coeff", "1e-3", "--moe-spec-ortho-coeff", "0.5",
                 "--moe-spec-var-coeff", "0.25", "--moe-spec-sp-similarity", "abs_cosine",
                 "--moe-spec-sp-max-tokens", "128", "--moe-spec-cp-form", "log", "--moe-spec-cp-pipeline", "skip",
                 "--moe-spec-v-form", "per_token", "--moe-spec-eps", "1e-5", "--moe-spec-metrics",
                 "--moe-spec-metrics-interval", "7")
    assert megatron_lm.specialization_config_from_args(args) == SpecializationConfig(
        sp_coeff=2e-3, cp_coeff=1e-3, ortho_coeff=0.5, var_coeff=0.25, sp_similarity="abs_cosine",
        sp_max_tokens=128, cp_form="log", cp_pipeline="skip", v_form="per_token", eps=1e-5, metrics=True,
        metrics_interval=7)
    assert parse("--no-moe-spec-metrics").moe_spec_metrics is False


@pytest.mark.parametrize("flag", ["--moe-spec-cp-form", "--moe-spec-sp-similarity", "--moe-spec-v-form",
                                  "--moe-spec-cp-pipeline"])
def test_choice_flags_reject_unknown_values(flag, capsys):
    with pytest.raises(SystemExit):
        parse(flag, "nope")
    assert flag in capsys.readouterr().err


def test_chained_provider_keeps_the_existing_one():
    def existing(p):
        p.add_argument("--modelopt-thing", type=int, default=3)
        return p

    p = megatron_lm.chain_extra_args_provider(existing)(argparse.ArgumentParser(allow_abbrev=False))
    args = p.parse_args(["--modelopt-thing", "5", "--moe-spec-sp-coeff", "1e-3"])
    assert args.modelopt_thing == 5 and args.moe_spec_sp_coeff == 1e-3
    # None (Megatron-LM without modelopt) chains to ours alone.
    p = megatron_lm.chain_extra_args_provider(None)(argparse.ArgumentParser(allow_abbrev=False))
    assert p.parse_args([]).moe_spec_sp_coeff is None


# ------------------------------------------------------------------------------------ config
def test_yaml_block_then_flags_override(tmp_path):
    path = write(tmp_path / "spec.yaml",
                 "model:\n  num_layers: 4\nspecialization:\n  sp_coeff: 2.0e-3\n  cp_coeff: 1.0e-3\n"
                 "  cp_form: log\n  metrics: true\n")
    args = parse("--moe-spec-config", path, "--moe-spec-cp-coeff", "5e-4", "--no-moe-spec-metrics")
    cfg = megatron_lm.specialization_config_from_args(args)
    assert (cfg.sp_coeff, cfg.cp_coeff, cfg.cp_form, cfg.metrics) == (2e-3, 5e-4, "log", False)


def test_yaml_include_is_resolved_like_our_run_configs():
    # The shipped variant overlay: only its specialization: block is used.
    args = parse("--moe-spec-config", os.path.join(ROOT, "configs", "variants", "lb_sp_cp.yaml"))
    cfg = megatron_lm.specialization_config_from_args(args)
    assert (cfg.sp_coeff, cfg.cp_coeff, cfg.ortho_coeff, cfg.var_coeff) == (2e-3, 1e-3, 0.0, 0.0)


def test_yaml_cfg_namespace_block_is_read():
    # Megatron-LM's --yaml-cfg replaces argparse: nested mappings arrive as SimpleNamespaces.
    args = types.SimpleNamespace(yaml_cfg="run.yaml",
                                 specialization=types.SimpleNamespace(sp_coeff=1e-3, metrics=True),
                                 moe_spec_metrics_interval=5)
    cfg = megatron_lm.specialization_config_from_args(args)
    assert (cfg.sp_coeff, cfg.metrics, cfg.metrics_interval) == (1e-3, True, 5)


@pytest.mark.parametrize("argv, names", [
    (["--moe-spec-sp-coeff", "-1"], "--moe-spec-sp-coeff"),
    (["--moe-spec-metrics-interval", "0"], "--moe-spec-metrics-interval"),
    (["--moe-spec-sp-max-tokens", "0"], "--moe-spec-sp-max-tokens"),
    (["--moe-spec-eps", "0"], "--moe-spec-eps"),
])
def test_flag_errors_name_the_flag(argv, names):
    with pytest.raises(ValueError) as e:
        megatron_lm.specialization_config_from_args(parse(*argv))
    assert str(e.value).startswith(names + ":"), str(e.value)


def test_yaml_errors_name_the_file_and_key(tmp_path):
    path = write(tmp_path / "bad.yaml", "specialization:\n  var_coeff: -2.0\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: specialization.var_coeff")):
        megatron_lm.specialization_config_from_args(parse("--moe-spec-config", path))
    # ... and a flag fixing the value wins.
    cfg = megatron_lm.specialization_config_from_args(parse("--moe-spec-config", path, "--moe-spec-var-coeff", "0"))
    assert cfg.var_coeff == 0.0
    path = write(tmp_path / "typo.yaml", "specialization:\n  sp_coef: 1.0\n")
    with pytest.raises(ValueError, match="sp_coef"):
        megatron_lm.specialization_config_from_args(parse("--moe-spec-config", path))
    with pytest.raises(ValueError, match="--moe-spec-config: file not found"):
        megatron_lm.specialization_config_from_args(parse("--moe-spec-config", str(tmp_path / "missing.yaml")))


# ------------------------------------------------------------------------------ track names
def megatron_args(*argv, balancing="aux_loss", z=None):
    args = parse(*argv)
    args.moe_router_load_balancing_type = balancing
    args.moe_z_loss_coeff = z
    return args


def test_track_names_megatron_list_plus_enabled_losses():
    args = megatron_args("--moe-spec-sp-coeff", "2e-3", "--moe-spec-var-coeff", "1e-3", z=1e-3)
    assert megatron_lm.track_names(args) == ["load_balancing_loss", "z_loss", "specialization_loss", "variance_loss"]
    args = megatron_args("--moe-spec-cp-coeff", "1e-3", "--moe-spec-ortho-coeff", "1e-3", balancing="seq_aux_loss")
    # "aux_loss" in "seq_aux_loss" is true in megatron's own check, so both are tracked.
    assert megatron_lm.track_names(args) == ["load_balancing_loss", "seq_load_balancing_loss",
                                             "coupling_loss", "orthogonality_loss"]


def test_track_names_extends_the_given_list_without_duplicates():
    args = megatron_args("--moe-spec-sp-coeff", "2e-3", "--moe-spec-cp-coeff", "1e-3", "--moe-spec-ortho-coeff",
                         "1e-3", "--moe-spec-var-coeff", "1e-3", balancing="none")
    given = ["global_load_balancing_loss", "coupling_loss"]
    out = megatron_lm.track_names(args, given)
    assert out == ["global_load_balancing_loss", "coupling_loss", "specialization_loss", "orthogonality_loss",
                   "variance_loss"]
    assert given == ["global_load_balancing_loss", "coupling_loss"]  # not mutated


def test_track_names_unchanged_when_off_even_with_metrics():
    # Metrics are not tracker losses; a disabled loss must not be force-initialized (a flat 0 curve).
    args = megatron_args("--moe-spec-metrics", z=1e-3)
    assert megatron_lm.track_names(args, ["load_balancing_loss"]) == ["load_balancing_loss"]


# ---------------------------------------------------------------------- the layer-spec hook
def tiny_config(**overrides):
    from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, build_transformer_config

    # Megatron-LM copies --transformer-impl into the config; local modules on CPU.
    extra = {"transformer_impl": "local", **overrides.pop("extra_config", {})}
    return build_transformer_config(TinyGPTSettings(num_moe_experts=4, extra_config=extra, **overrides))


def stock_block(config, vp_stage=None):
    """What Megatron-LM's gpt_builder builds for an MoE model (local modules)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization,
                                      vp_stage=vp_stage)


OUR_NAMES = ("specialization_loss", "coupling_loss", "orthogonality_loss", "variance_loss")


@pytest.fixture
def run_args(monkeypatch, megatron_single_process):
    """Stand-in for Megatron-LM's global args (what get_args() returns in a run)."""
    from megatron_moe_spec.core import layer_metrics, moe_tracker

    holder = {}

    def set_args(*argv):
        holder["args"] = parse(*argv)
        megatron_lm.reset_state()
        return holder["args"]

    def clean():
        layer_metrics.register_layers([], 1)
        moe_tracker.forget(OUR_NAMES)  # the live tracker (from 0.18 the legacy getter returns a copy)
        moe_tracker.clear()

    clean()
    monkeypatch.setattr(megatron_lm, "_megatron_args", lambda: holder.get("args"))
    yield set_args
    clean()


def layer_modules(spec):
    return [s.module.__name__ for s in spec.layer_specs]


def test_hook_leaves_the_spec_alone_when_off(run_args):
    config = tiny_config()
    block = stock_block(config)
    # No Megatron-LM args at all (a tool building a model outside pretrain): unchanged.
    assert megatron_lm.specialize_layer_spec(block, config, None) is block
    run_args()  # args without any --moe-spec-* flag
    assert megatron_lm.specialize_layer_spec(block, config, None) is block


def _module_and_kwargs(spec):
    """A ModuleSpec's (module, params), or a functools.partial's (func, keywords): megatron-core >= 0.18
    specs the MoE layer as a partial."""
    import functools

    if isinstance(spec, functools.partial):
        return spec.func, spec.keywords
    return getattr(spec, "module", None), getattr(spec, "params", {})


def test_hook_substitutes_and_registers_when_on(run_args):
    from megatron_moe_spec.core import layer_metrics, moe_tracker

    run_args("--moe-spec-sp-coeff", "2e-3", "--moe-spec-cp-coeff", "1e-3", "--moe-spec-metrics")
    config = tiny_config(moe_layer_freq=[1, 0, 1, 1])
    block = stock_block(config)
    out = megatron_lm.specialize_layer_spec(block, config, None)
    assert layer_modules(out) == ["SpecializationTransformerLayer"] * 4
    moe = [_module_and_kwargs(s.submodules.mlp)[1] for s in out.layer_specs
           if _module_and_kwargs(s.submodules.mlp)[0].__name__ == "SpecializationMoELayer"]
    assert len(moe) == 3 and moe[0]["spec_config"].sp_coeff == 2e-3
    tracker = moe_tracker.recorded_names()
    assert "specialization_loss" in tracker and "coupling_loss" in tracker
    assert "variance_loss" not in tracker
    assert layer_metrics.registered_layers() == [1, 3, 4]
    # A second call (the next model chunk, or the hook after our own --spec callable) is a no-op.
    assert megatron_lm.specialize_layer_spec(out, config, None) is out


def test_hook_calls_a_spec_callable_with_config_and_vp_stage(run_args):
    run_args("--moe-spec-var-coeff", "1e-3")
    config = tiny_config()
    out = megatron_lm.specialize_layer_spec(megatron_lm.gpt_layer_spec, config, None)
    assert layer_modules(out) == ["SpecializationTransformerLayer"] * 4
    seen = {}

    def user_spec(cfg, vp_stage=None):
        seen["args"] = (cfg, vp_stage)
        return stock_block(cfg)

    out = megatron_lm.specialize_layer_spec(user_spec, config, 1)
    assert seen["args"] == (config, 1) and layer_modules(out) == ["SpecializationTransformerLayer"] * 4


def test_gpt_layer_spec_is_stock_when_off(run_args):
    run_args()
    config = tiny_config()
    assert layer_modules(megatron_lm.gpt_layer_spec(config)) == ["TransformerLayer"] * 4


def test_hook_refuses_what_the_losses_cannot_serve(run_args):
    run_args("--moe-spec-sp-coeff", "2e-3")
    config = tiny_config(extra_config={"gated_linear_unit": False})
    with pytest.raises(ValueError, match="gated"):
        megatron_lm.specialize_layer_spec(stock_block(config), config, None)


def test_register_model_refuses_stock_moe_layers_when_on(run_args):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    stock = MoELayer.__new__(MoELayer)
    torch.nn.Module.__init__(stock)
    model = torch.nn.Module()
    model.decoder = torch.nn.ModuleList([stock])
    run_args()
    megatron_lm.register_model(model)  # off: nothing to check
    run_args("--moe-spec-sp-coeff", "2e-3")
    with pytest.raises(RuntimeError, match="patch"):
        megatron_lm.register_model(model)


def test_one_training_step_through_the_hooks(run_args):
    """The patched builder's path on CPU: Megatron-LM's stock MoE block -> specialize_layer_spec ->
    GPTModel -> register_model -> one step with megatron's schedule -> our losses are in the tracker
    under track_names, and the metrics hook writes moe/ tags."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, build_model, local_microbatches, run_step

    args = run_args("--moe-spec-sp-coeff", "2e-3", "--moe-spec-cp-coeff", "1e-3", "--moe-spec-metrics")
    args.moe_router_load_balancing_type, args.moe_z_loss_coeff = "aux_loss", None
    settings = TinyGPTSettings(num_moe_experts=4)
    config = tiny_config()

    def builder_spec(cfg, vp_stage=None):  # the two lines the patch adds to gpt_builder
        return megatron_lm.specialize_layer_spec(stock_block(cfg, vp_stage), cfg, vp_stage)

    chunks = build_model(config, settings, layer_spec_fn=builder_spec)
    for chunk in chunks:
        megatron_lm.register_model(chunk.module)
    assert len(megatron_lm._STATE.layers) == 4
    # megatron keeps the aux-loss backward scale in a class attribute; another test in this process
    # may have left one of a different shape.
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    run_step(chunks, config, local_microbatches(settings), settings)

    names = megatron_lm.track_names(args)
    assert names == ["load_balancing_loss", "specialization_loss", "coupling_loss"]
    tracker = get_moe_layer_wise_logging_tracker()
    sp = tracker["specialization_loss"]["values"]
    cp = tracker["coupling_loss"]["values"]
    assert bool((sp != 0).all())
    assert bool((cp[:3] != 0).all()) and cp[3] == 0  # R_cp is indexed by the earlier layer of a pair
    pairs = cp[:3].tolist()  # the three pairs (1,2), (2,3), (3,4), before the hook
    sp_layers = sp.tolist()

    # What the patched training_log does next: our hook, then megatron's own report.
    args.num_layers, args.moe_layer_freq, args.mtp_num_layers = 4, 1, None
    megatron_lm.report_coupling_as_pair_mean(args)
    reported = megatron_report(names, num_layers=4, moe_layer_freq=1, loss_scale=0.5)
    assert reported["coupling_loss"] == pytest.approx(0.5 * sum(pairs) / 3, rel=1e-6)  # not / 4
    assert reported["specialization_loss"] == pytest.approx(0.5 * sum(sp_layers) / 4, rel=1e-6)  # untouched
    writer = FakeWriter()
    scalars = megatron_lm.log_specialization_metrics(1, writer, None)
    assert {"moe/routing_entropy", "moe/load_cv", "moe/activation_similarity"} <= set(scalars)
    assert {tag for tag, _, _ in writer.scalars} == set(scalars)
    assert all(step == 1 for _, _, step in writer.scalars)


def megatron_report(names, num_layers, moe_layer_freq, loss_scale=1.0, mtp_num_layers=None):
    """megatron-core's MoE tracker report (reduce, mean over MoE layers, clear) -> total_loss_dict."""
    total = {}
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:  # megatron-core < 0.18
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics

        track_moe_metrics(loss_scale=loss_scale, iteration=1, total_loss_dict=total, force_initialize=True,
                          track_names=names, num_layers=num_layers, moe_layer_freq=moe_layer_freq,
                          mtp_num_layers=mtp_num_layers)
    else:
        get_moe_metrics_tracker().report(loss_scale=loss_scale, iteration=1, total_loss_dict=total,
                                         force_initialize=True, track_names=names, num_layers=num_layers,
                                         moe_layer_freq=moe_layer_freq, mtp_num_layers=mtp_num_layers)
    return {k: float(v) for k, v in total.items()}


# -------------------------------------------------------------- the hybrid stack spec hook
def _has_hybrid():
    from megatron_moe_spec.run_config import hybrid_model_available

    return hybrid_model_available()


needs_hybrid = pytest.mark.skipif(not _has_hybrid(), reason="HybridModel needs megatron-core >= 0.19 "
                                  "(on older versions the hook refuses: test_hybrid_hook_refuses_older_megatron_core)")
HYBRID_PATTERN = "*E*-*E*E"  # E at 0-based 1, 5, 7: R_cp pairs (1, 5) across a dense layer, and (5, 7)


def hybrid_args(run_args, *argv):
    args = run_args(*argv)
    args.hybrid_layer_pattern = HYBRID_PATTERN
    args.moe_router_load_balancing_type, args.moe_z_loss_coeff = "aux_loss", None
    return args


def hybrid_config():
    return tiny_config(num_layers=len(HYBRID_PATTERN))


@needs_hybrid
def test_hybrid_hook_leaves_the_spec_alone_when_off(run_args):
    from megatron_moe_spec.core.hybrid import local_hybrid_stack_spec

    config = hybrid_config()
    stock = local_hybrid_stack_spec(config)
    assert megatron_lm.specialize_hybrid_stack_spec(stock, config, None) is stock  # no Megatron-LM args
    hybrid_args(run_args)
    assert megatron_lm.specialize_hybrid_stack_spec(stock, config, None) is stock
    # --spec megatron_moe_spec.megatron_lm hybrid_stack_spec: the callable is resolved, stock modules
    out = megatron_lm.specialize_hybrid_stack_spec(megatron_lm.hybrid_stack_spec, config, None)
    assert out.module.__name__ == "LocalHybridStack"
    assert out.submodules.moe_layer.module.__name__ == "MoETransformerLayer"


@needs_hybrid
def test_one_hybrid_step_through_the_hooks(run_args):
    """pretrain_hybrid.py's path on CPU: --spec megatron_moe_spec.megatron_lm hybrid_stack_spec ->
    specialize_hybrid_stack_spec -> HybridModel -> register_model -> forward/backward -> our losses on the E
    layers only, R_cp reported as the mean over its 2 pairs by megatron's own report, the metrics hook."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_moe_spec.core import layer_metrics, moe_tracker

    args = hybrid_args(run_args, "--moe-spec-sp-coeff", "2e-3", "--moe-spec-cp-coeff", "1e-3", "--moe-spec-metrics")
    moe_tracker.forget(["load_balancing_loss"])  # sized by the GPT tests' 4 layers; this model has 8
    config = hybrid_config()
    spec = megatron_lm.specialize_hybrid_stack_spec(megatron_lm.hybrid_stack_spec, config, None)
    assert spec.module.__name__ == "SpecializationHybridStack"
    assert megatron_lm.specialize_hybrid_stack_spec(spec, config, None) is spec  # the next chunk: no-op
    assert layer_metrics.registered_layers() == [2, 6, 8]
    assert megatron_lm._STATE.coupling == slots([1, 5], [7])
    assert {"specialization_loss", "coupling_loss"} <= set(moe_tracker.recorded_names())

    torch.manual_seed(0)
    model = HybridModel(config=config, hybrid_stack_spec=spec, vocab_size=128, max_sequence_length=16,
                        hybrid_layer_pattern=HYBRID_PATTERN, position_embedding_type="rope")
    megatron_lm.register_model(model)
    assert len(megatron_lm._STATE.layers) == 3
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=tokens[:, :-1], position_ids=torch.arange(16).expand(2, -1), attention_mask=None,
                labels=tokens[:, 1:])
    out.float().mean().backward()

    names = megatron_lm.track_names(args)
    assert names == ["load_balancing_loss", "specialization_loss", "coupling_loss"]
    sp = moe_tracker.values("specialization_loss").tolist()
    cp = moe_tracker.values("coupling_loss").tolist()
    assert [i for i, v in enumerate(sp) if v != 0] == [1, 5, 7]
    assert [i for i, v in enumerate(cp) if v != 0] == [1, 5]
    # What training_log does on megatron-core 0.19: our hook, then megatron's report over the E layers.
    args.num_layers, args.moe_layer_freq, args.mtp_num_layers = len(HYBRID_PATTERN), 1, None
    assert megatron_lm.megatron_moe_layer_count(args) == 3
    megatron_lm.report_coupling_as_pair_mean(args)
    reported = megatron_report(names, num_layers=3, moe_layer_freq=1)
    assert reported["coupling_loss"] == pytest.approx((cp[1] + cp[5]) / 2, rel=1e-6)  # not / 3
    assert reported["specialization_loss"] == pytest.approx(sum(sp) / 3, rel=1e-6)
    scalars = megatron_lm.log_specialization_metrics(1, FakeWriter(), None)
    assert {"moe/routing_entropy", "moe/load_cv", "moe/pathway_nmi"} <= set(scalars)


@needs_hybrid
def test_hybrid_hook_refuses_what_it_cannot_serve(run_args):
    from megatron_moe_spec.core.hybrid import local_hybrid_stack_spec

    args = hybrid_args(run_args, "--moe-spec-sp-coeff", "2e-3")
    config = hybrid_config()
    args.hybrid_layer_pattern = "*E*-*E*E/*E"
    with pytest.raises(ValueError, match="multi-token prediction"):
        megatron_lm.specialize_hybrid_stack_spec(local_hybrid_stack_spec(config), config, None)
    args.hybrid_layer_pattern = None
    with pytest.raises(ValueError, match="needs --hybrid-layer-pattern"):
        megatron_lm.specialize_hybrid_stack_spec(local_hybrid_stack_spec(config), config, None)


def test_hybrid_hook_refuses_older_megatron_core(run_args, monkeypatch):
    from packaging.version import Version

    from megatron_moe_spec.core import version

    monkeypatch.setattr(version, "megatron_core_version", lambda: Version("0.18.2"))
    hybrid_args(run_args, "--moe-spec-sp-coeff", "2e-3")
    with pytest.raises(RuntimeError, match=r"needs megatron-core >= 0.19.*0\.18\.2.*core_v0\.19\.0"):
        megatron_lm.specialize_hybrid_stack_spec(object(), types.SimpleNamespace(), None)
    run_args()  # off: nothing is refused, the spec passes through
    spec = object()
    assert megatron_lm.specialize_hybrid_stack_spec(spec, types.SimpleNamespace(), None) is spec


@pytest.mark.parametrize("pattern, mtp, repeated, new_report, expected", [
    ("*E*-*E*E", None, False, False, 3),   # core_v0.18.0 .. core_v0.19.0: report(num_layers=<E>, freq 1)
    ("*E*E/*E/*E", 2, False, False, 6),    # <E> counts the MTP depths' E (4), + mtp_num_layers (2)
    ("*E*E/*E/*E", 2, False, True, 4),     # main: main E + MTP E per depth
    ("*E*E/*E/*E", 2, True, True, 3),      # main, --mtp-use-repeated-layer: once
    ("*E|*E*-", None, False, True, 2),
])
def test_megatron_moe_layer_count_of_a_hybrid_pattern(monkeypatch, pattern, mtp, repeated, new_report, expected):
    monkeypatch.setattr(megatron_lm, "_report_takes_num_moe_layers", lambda: new_report)
    args = types.SimpleNamespace(num_layers=8, moe_layer_freq=1, mtp_num_layers=mtp, mtp_use_repeated_layer=repeated,
                                 hybrid_layer_pattern=pattern)
    assert megatron_lm.megatron_moe_layer_count(args) == expected


def test_hybrid_coupling_slots_follow_the_pattern_and_its_segments():
    one = types.SimpleNamespace(pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None)
    pp2 = types.SimpleNamespace(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=None)
    assert megatron_lm.hybrid_coupling_slots(one, "*E*-*E*E") == slots([1, 5], [7])
    assert megatron_lm.hybrid_coupling_slots(pp2, "*E*-|*E*E", "skip") == slots([5], [1, 7])  # (1, 5) crosses |
    assert megatron_lm.hybrid_coupling_slots(pp2, "*E*-|*E*E", "exact") == slots([1, 5], [7])
    # PP2 without '|' (megatron's deprecated even split, layers 0-3 | 4-7): the split is the layout's,
    # not the pattern's, as for the GPT layers (layer_specs.coupled_layers).
    assert megatron_lm.hybrid_coupling_slots(pp2, "*E*-*E*E", "skip") == slots([5], [1, 7])


# ------------------------------------------------------------------- R_cp: the mean over pairs
def slots(pairs, pairless):
    return megatron_lm.CouplingSlots(tuple(pairs), tuple(pairless))


@pytest.mark.parametrize("layout, values, counted, expected", [
    # 4 MoE layers, one stage: pairs at 0, 1, 2; the last MoE layer (3) has none.
    (slots([0, 1, 2], [3]), [3.0, 6.0, 9.0, 0.0], 4, [3.0, 6.0, 9.0, 6.0]),
    # PP=2 splits the pair (2, 3): only (1, 2) and (3, 4) remain, at slots 0 and 2.
    (slots([0, 2], [1, 3]), [2.0, 0.0, 4.0, 0.0], 4, [2.0, 3.0, 4.0, 3.0]),
    # Dense first layer (MoE layers 2..4) and one MTP layer, which megatron counts (slot 4).
    (slots([1, 2], [3, 4]), [0.0, 1.0, 5.0, 0.0, 0.0], 4, [0.0, 1.0, 5.0, 3.0, 3.0]),
    # No pair at all (every pair split): nothing to average, left as is.
    (slots([], [0, 1]), [0.0, 0.0], 2, [0.0, 0.0]),
])
def test_fill_pairless_slots_makes_megatrons_mean_the_mean_over_pairs(layout, values, counted, expected):
    values_L = torch.tensor(values)
    megatron_lm.fill_pairless_slots(values_L, layout, counted)
    assert values_L.tolist() == pytest.approx(expected)
    if layout.pair_slots:  # megatron's report: the sum over all slots / the MoE layers it counts
        pair_mean = sum(values[i] for i in layout.pair_slots) / len(layout.pair_slots)
        assert float(values_L.sum()) / counted == pytest.approx(pair_mean)


def test_fill_is_linear_so_it_commutes_with_megatrons_reduction():
    # Two pipeline stages hold disjoint pairs; megatron sums the stages' tensors after the hook.
    layout = slots([0, 1, 2], [3])
    stage0, stage1 = torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 6.0, 0.0])
    for t in (stage0, stage1):
        megatron_lm.fill_pairless_slots(t, layout, 4)
    assert float((stage0 + stage1).sum()) / 4 == pytest.approx(3.0)


def test_coupling_slots_follow_the_pipeline_split(megatron_single_process):
    import dataclasses

    config = tiny_config()
    assert megatron_lm.coupling_slots(config) == slots([0, 1, 2], [3])
    pp2 = dataclasses.replace(config, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    assert megatron_lm.coupling_slots(pp2) == slots([0, 2], [1, 3])  # skip: pair (2, 3) crosses stages
    assert megatron_lm.coupling_slots(pp2, "exact") == slots([0, 1, 2], [3])  # exact: computed across
    mtp = dataclasses.replace(config, moe_layer_freq=[0, 1, 1, 1], mtp_num_layers=1)
    assert megatron_lm.coupling_slots(mtp) == slots([1, 2], [3, 4])


@pytest.mark.parametrize("freq, mtp, repeated, new_report, expected", [
    (1, None, False, False, 4),
    ([0, 1, 1, 1], None, False, False, 3),
    (2, 2, False, False, 4),             # core_v0.16.1 .. core_v0.19.0: + mtp_num_layers, always
    ([1, 1, 1, 0], 2, False, False, 5),
    ([1, 1, 1, 0], 2, False, True, 3),   # main: MTP counts only after an MoE last layer
    ([1, 1, 1, 1], 2, False, True, 6),
    ([1, 1, 1, 1], 2, True, True, 5),    # main, --mtp-use-repeated-layer: once
])
def test_megatron_moe_layer_count_per_version(monkeypatch, freq, mtp, repeated, new_report, expected):
    monkeypatch.setattr(megatron_lm, "_report_takes_num_moe_layers", lambda: new_report)
    args = types.SimpleNamespace(num_layers=4, moe_layer_freq=freq, mtp_num_layers=mtp,
                                 mtp_use_repeated_layer=repeated)
    assert megatron_lm.megatron_moe_layer_count(args) == expected


def test_pair_mean_hook_is_a_no_op_without_r_cp(run_args):
    from megatron_moe_spec.core import moe_tracker
    from megatron_moe_spec.core.aux_losses import register_loss_names

    args = run_args("--moe-spec-sp-coeff", "2e-3")
    args.num_layers, args.moe_layer_freq, args.mtp_num_layers = 4, 1, None
    megatron_lm._STATE.coupling = slots([0, 1, 2], [3])
    register_loss_names(["coupling_loss"], 4, reduce_group=None)
    moe_tracker.values("coupling_loss")[0] = 1.0
    megatron_lm.report_coupling_as_pair_mean(args)
    assert moe_tracker.values("coupling_loss").tolist() == [1.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------- the metrics hook
class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


class FakeLayer:
    def __init__(self):
        self.active = []
        self.steps = []

    def begin_step(self, active, step=None):
        self.active.append(active)
        self.steps.append(step)


def fake_report(tokens=10.0):
    return {"routing_entropy/layer_0": 1.0, "routing_entropy/layer_2": 3.0, "routing_entropy": 2.0,
            "load_cv": 0.5, "load_cv/layer_0": 0.4, "load_cv/layer_2": 0.6,
            "matrices": {0: {"tokens_per_expert": [tokens, 0.0]}, 2: {"tokens_per_expert": [0.0, 0.0]}}}


def test_metric_scalars_use_megatron_style_moe_tags():
    assert megatron_lm.metric_scalars(fake_report(), per_layer=False) == {"moe/routing_entropy": 2.0,
                                                                         "moe/load_cv": 0.5}
    tags = megatron_lm.metric_scalars(fake_report(), per_layer=True)
    assert tags["moe/routing_entropy_layer_2"] == 3.0 and tags["moe/load_cv_layer_0"] == 0.4 and len(tags) == 6


def test_metrics_hook_reports_every_interval_and_gates_collection(run_args, monkeypatch):
    from megatron_moe_spec.core import layer_metrics

    calls = []
    monkeypatch.setattr(layer_metrics, "report", lambda group=None: calls.append(1) or fake_report())
    args = run_args("--moe-spec-metrics", "--moe-spec-metrics-interval", "3")
    args.moe_per_layer_logging = True
    layer = FakeLayer()
    import weakref
    megatron_lm._STATE.layers.append(weakref.ref(layer))
    writer = FakeWriter()
    logged = [megatron_lm.log_specialization_metrics(it, writer, None) for it in range(1, 7)]
    assert len(calls) == 2  # iterations 3 and 6 only; report() is a collective on every rank
    assert [it for it, out in zip(range(1, 7), logged) if out] == [3, 6]
    assert {step for _, _, step in writer.scalars} == {3, 6}
    assert ("moe/routing_entropy_layer_2", 3.0, 6) in writer.scalars
    # Collection is on exactly for the iterations that will be reported (3 and 6): set after 2, 5.
    assert layer.active == [False, True, False, False, True, False]
    # The iteration about to run (it rotates the sp_max_tokens subset alike on every rank).
    assert layer.steps == [2, 3, 4, 5, 6, 7]


def test_metrics_hook_skips_an_empty_report_and_is_a_no_op_when_off(run_args, monkeypatch):
    from megatron_moe_spec.core import layer_metrics

    calls = []
    monkeypatch.setattr(layer_metrics, "report", lambda group=None: calls.append(1) or fake_report(tokens=0.0))
    run_args("--moe-spec-metrics")
    writer = FakeWriter()
    assert megatron_lm.log_specialization_metrics(1, writer, None) is None
    assert calls == [1] and writer.scalars == []
    run_args("--moe-spec-sp-coeff", "1e-3")  # losses on, metrics off: no collective at all
    assert megatron_lm.log_specialization_metrics(1, writer, None) is None and calls == [1]


# -------------------------------------------------------------------------------- the patches
def patch_files():
    return sorted(f for f in os.listdir(PATCH_DIR) if f.endswith(".patch"))


def parse_unified_diff(text):
    """{path: [(old_start, old_len, new_start, new_len, lines)]}; asserts it is well formed."""
    files = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("diff --git "):
            m = re.match(r"diff --git a/(\S+) b/(\S+)$", line)
            assert m and m.group(1) == m.group(2), line
            path = m.group(1)
            i += 1
            while not lines[i].startswith("--- "):
                assert lines[i].startswith("index "), lines[i]
                i += 1
            assert lines[i] == f"--- a/{path}" and lines[i + 1] == f"+++ b/{path}", lines[i:i + 2]
            i += 2
            files[path] = []
            continue
        m = re.match(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", line)
        assert m, f"unexpected line {i + 1}: {line!r}"
        old_len, new_len = int(m.group(2) or 1), int(m.group(4) or 1)
        i += 1
        body = []
        while i < len(lines) and (old_len - sum(l[0] in " -" for l in body) > 0
                                  or new_len - sum(l[0] in " +" for l in body) > 0):
            assert lines[i][:1] in (" ", "-", "+"), f"bad hunk line {i + 1}: {lines[i]!r}"
            body.append(lines[i])
            i += 1
        assert sum(l[0] in " -" for l in body) == old_len and sum(l[0] in " +" for l in body) == new_len
        files[path].append((int(m.group(1)), old_len, int(m.group(3)), new_len, body))
    return files


def read_index():
    """patches/megatron-lm.index: {ref: patch file}, in file order."""
    index = {}
    with open(os.path.join(PATCH_DIR, "megatron-lm.index")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                ref, patch = line.split()
                assert ref not in index, ref
                index[ref] = patch
    return index


def test_the_index_maps_every_checked_ref_to_a_shipped_patch():
    assert read_index() == CHECKED_REFS
    assert patch_files() == sorted(PATCHED_FILES) == sorted(set(CHECKED_REFS.values()))


@pytest.mark.parametrize("patch", sorted(PATCHED_FILES))
def test_patch_is_a_small_well_formed_diff_of_the_expected_files(patch):
    with open(os.path.join(PATCH_DIR, patch)) as f:
        files = parse_unified_diff(f.read())
    assert set(files) == PATCHED_FILES[patch]
    added = [l[1:] for hunks in files.values() for h in hunks for l in h[4] if l.startswith("+")]
    removed = [l[1:] for hunks in files.values() for h in hunks for l in h[4] if l.startswith("-")]
    assert len(added) <= 20 and len(removed) <= 3, (added, removed)
    # Every file imports the hooks once; every added line is ours (marked) or the continuation
    # of a marked statement; the only removed line is the extra_args_provider it wraps.
    for path, hunks in files.items():
        plus = [l[1:] for h in hunks for l in h[4] if l.startswith("+")]
        assert plus.count("from megatron_moe_spec import megatron_lm as moe_spec  # megatron-moe-spec") == 1, path
    assert all(l.endswith("  # megatron-moe-spec") for l in added), added
    # Removed: the extra_args_provider line of each entry point (pretrain_gpt.py, and pretrain_hybrid.py
    # from core_v0.18.0); core_v0.19.0's HybridModelBuilder returns HybridModel(...) directly, which the
    # patch turns into model = HybridModel(...) to register it.
    provider = "        extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None,"
    entry_points = [p for p in ("pretrain_gpt.py", "pretrain_hybrid.py") if p in files]
    expected_removed = [provider] * len(entry_points)
    if patch == "megatron-lm-core_v0.19.0-main.patch":
        expected_removed.append("        return HybridModel(")
    assert sorted(removed) == sorted(expected_removed), removed
    # training_log: our names, then the R_cp fix, both before megatron's report (one hunk).
    hooks = [l[1:].split("(")[0].strip() for h in files["megatron/training/training.py"] for l in h[4]
             if l.startswith("+") and "import" not in l]
    assert hooks == ["track_names = moe_spec.track_names", "moe_spec.report_coupling_as_pair_mean",
                     "moe_spec.log_specialization_metrics"]
    # The hybrid builder: the stack spec through our hook, then register_model on the built model.
    if patch in HYBRID_BUILDER:
        hooks = [l[1:].strip() for h in files[HYBRID_BUILDER[patch]] for l in h[4]
                 if l.startswith("+") and "import" not in l]
        assert hooks[0].startswith("hybrid_stack_spec = moe_spec.specialize_hybrid_stack_spec(hybrid_stack_spec, ")
        assert [h for h in hooks if "register_model" in h] == ["moe_spec.register_model(model)  # megatron-moe-spec"]


@pytest.mark.parametrize("patch", sorted(PATCHED_FILES))
def test_patch_calls_only_functions_that_exist(patch):
    with open(os.path.join(PATCH_DIR, patch)) as f:
        added = [l[1:] for l in f.read().splitlines() if l.startswith("+") and not l.startswith("+++")]
    called = set(re.findall(r"\bmoe_spec\.(\w+)\(", "\n".join(added)))
    assert called == {"chain_extra_args_provider", "specialize_layer_spec", "register_model", "track_names",
                      "report_coupling_as_pair_mean", "log_specialization_metrics"} | (
                          {"specialize_hybrid_stack_spec"} if patch in HYBRID_BUILDER else set())
    for name in called:
        assert callable(getattr(megatron_lm, name, None)), name
    # Each added line is valid Python on its own: a statement, or a keyword argument of the call
    # it sits in (the patched files themselves are byte-compiled, see docs/megatron_lm.md).
    for line in added:
        stmt = line.strip()
        code = stmt.split("  # megatron-moe-spec")[0]
        if code.endswith("("):  # model = HybridModel(: the opening of megatron's own call
            ast.parse(code + ")")
            continue
        try:
            ast.parse(stmt)
        except SyntaxError:
            ast.parse(f"f({stmt.rstrip(',')})")


def test_spec_entry_point_resolves_like_megatron_import_module():
    # --spec megatron_moe_spec.megatron_lm gpt_layer_spec: megatron's import_module(["module", "name"]).
    from megatron.core.transformer.spec_utils import import_module

    assert import_module([megatron_lm.SPEC_MODULE, megatron_lm.SPEC_FUNCTION]) is megatron_lm.gpt_layer_spec


def test_apply_script_refuses_a_non_megatron_dir_clearly(tmp_path):
    script = os.path.join(ROOT, "scripts", "apply_megatron_lm_patch.sh")
    r = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "does not look like a Megatron-LM checkout" in r.stderr
    (tmp_path / "megatron" / "training").mkdir(parents=True)
    write(tmp_path / "pretrain_gpt.py", "print('not the real one')\n")
    r = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "no shipped patch applies cleanly" in r.stderr
    assert "core_v0.16.1" in r.stderr and "core_v0.19.0" in r.stderr
    r = subprocess.run(["bash", script, str(tmp_path), "core_v0.1.0"], capture_output=True, text=True)
    assert r.returncode == 2 and "no patch for 'core_v0.1.0'" in r.stderr
    r = subprocess.run(["bash", script, str(tmp_path), "core_v0.16.1"], capture_output=True, text=True)
    assert r.returncode == 1 and "does not apply cleanly" in r.stderr
    assert open(tmp_path / "pretrain_gpt.py").read() == "print('not the real one')\n"  # untouched


def preimage_tree(root, patch):
    """A stand-in checkout that ``patch`` applies to: each file holds the patch's pre-image lines
    (context and removed lines) at their line numbers, with distinct filler lines in between."""
    with open(os.path.join(PATCH_DIR, patch)) as f:
        files = parse_unified_diff(f.read())
    for path, hunks in files.items():
        lines = {}
        for old_start, _, _, _, body in hunks:
            for offset, line in enumerate(l[1:] for l in body if l[0] in " -"):
                lines[old_start + offset] = line
        text = [lines.get(n, f"# filler {n}") for n in range(1, max(lines) + 4)]
        os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
        write(os.path.join(root, path), "\n".join(text) + "\n")
    os.makedirs(os.path.join(root, "megatron", "training"), exist_ok=True)
    if not os.path.exists(os.path.join(root, "pretrain_gpt.py")):
        write(os.path.join(root, "pretrain_gpt.py"), "")
    return files


def apply_script(*argv):
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "apply_megatron_lm_patch.sh"), *map(str, argv)],
                          capture_output=True, text=True)


def tree_text(root):
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n)).read()
            for d, _, names in os.walk(root) if ".git" not in d for n in names}


@pytest.mark.parametrize("patch", sorted(PATCHED_FILES))
def test_apply_script_detects_the_patch_that_applies(tmp_path, patch):
    files = preimage_tree(tmp_path, patch)
    r = apply_script(tmp_path)
    assert r.returncode == 0 and f"detected: patches/{patch} applies" in r.stdout, r.stdout + r.stderr
    for path, hunks in files.items():  # every added line landed
        text = open(tmp_path / path).read()
        for _, _, _, _, body in hunks:
            for line in (l[1:] for l in body if l[0] == "+"):
                assert line + "\n" in text, (path, line)
    before = tree_text(tmp_path)
    r = apply_script(tmp_path)  # a second run: no-op
    assert r.returncode == 0 and "already has the megatron-moe-spec patch" in r.stdout
    assert tree_text(tmp_path) == before


@pytest.mark.parametrize("patch", sorted(PATCHED_FILES))
def test_apply_script_uses_the_index_for_a_given_ref(tmp_path, patch):
    preimage_tree(tmp_path, patch)
    before = tree_text(tmp_path)
    other = next(ref for ref, p in CHECKED_REFS.items() if p != patch)
    r = apply_script(tmp_path, other)  # the other ref's patch: refused, untouched
    assert r.returncode == 1 and f"patches/{CHECKED_REFS[other]} does not apply cleanly" in r.stderr
    assert tree_text(tmp_path) == before
    ref = next(ref for ref, p in CHECKED_REFS.items() if p == patch)
    r = apply_script(tmp_path, ref)
    assert r.returncode == 0 and f"applied patches/{patch}" in r.stdout and "detected" not in r.stdout


def _git(root, *argv):
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *argv], check=True,
                   capture_output=True)


def test_apply_script_uses_the_exact_tag_of_a_git_checkout(tmp_path):
    # A checkout tagged core_v0.16.1 whose files are those of the 0.18 patch: the tag decides (and
    # its patch does not apply), no trying of the other patches.
    preimage_tree(tmp_path, CHECKED_REFS["core_v0.18.0"])
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "x")
    _git(tmp_path, "tag", "core_v0.16.1")
    r = apply_script(tmp_path)
    assert r.returncode == 1 and f"patches/{CHECKED_REFS['core_v0.16.1']} does not apply cleanly" in r.stderr
    _git(tmp_path, "tag", "-d", "core_v0.16.1")
    _git(tmp_path, "tag", "core_v0.99.0")  # a tag the index does not know: the patches are tried
    r = apply_script(tmp_path)
    assert r.returncode == 0 and "not in patches/megatron-lm.index" in r.stderr
    assert f"detected: patches/{CHECKED_REFS['core_v0.18.0']} applies" in r.stdout


def test_moe_layer_given_as_a_partial_is_substituted_too(megatron_single_process):
    # megatron-core 0.19 (Megatron-LM core_v0.19.0) specs the MoE layer as
    # functools.partial(MoELayer, submodules=MoESubmodules(...)) instead of a ModuleSpec.
    import dataclasses
    import functools

    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron_moe_spec.core.layer_specs import substitute_layer_spec
    from megatron_moe_spec.core.moe_layer import SpecializationMoELayer
    from megatron_moe_spec.core.router import SpecializationRouter

    layer = stock_block(tiny_config()).layer_specs[0]
    mlp = layer.submodules.mlp
    if isinstance(mlp, functools.partial):  # megatron-core >= 0.18: the stock spec already is one
        assert mlp.func is MoELayer
        as_partial = mlp
    else:
        as_partial = functools.partial(MoELayer, submodules=mlp.submodules)
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, mlp=as_partial))
    spec_config = SpecializationConfig(sp_coeff=1e-3)
    out = substitute_layer_spec(layer, spec_config).submodules.mlp
    assert isinstance(out, functools.partial) and out.func is SpecializationMoELayer
    assert out.keywords["spec_config"] is spec_config
    assert out.keywords["submodules"].router is SpecializationRouter
    assert out.keywords["submodules"].experts is as_partial.keywords["submodules"].experts


# ------------------------------------------------------------ pipeline stage without MoE layers
def _pp_stage_without_moe_layers():
    """One rank of PP=2 where stage 0 (layers 1-2) has no MoE layer: the hook registers our tracker
    names and metrics layers there too, so megatron's per-name PP all-reduce and our report() agree."""
    from megatron.core.transformer.moe.moe_utils import (
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )
    from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, build_model, local_microbatches, run_step

    args = parse("--moe-spec-sp-coeff", "2e-3", "--moe-spec-cp-coeff", "1e-3", "--moe-spec-metrics")
    args.moe_router_load_balancing_type, args.moe_z_loss_coeff = "none", None
    megatron_lm.reset_state()
    megatron_lm._megatron_args = lambda: args
    settings = TinyGPTSettings(num_moe_experts=4, moe_layer_freq=[0, 0, 1, 1], moe_router_load_balancing_type="none",
                               moe_aux_loss_coeff=0.0, num_microbatches=2)
    config = tiny_config(moe_layer_freq=[0, 0, 1, 1], moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                         num_microbatches=2)
    chunks = build_model(config, settings, layer_spec_fn=lambda c, vp_stage=None: megatron_lm.specialize_layer_spec(
        stock_block(c, vp_stage), c, vp_stage))
    for chunk in chunks:
        megatron_lm.register_model(chunk.module)
    names = megatron_lm.track_names(args)
    registered = sorted(n for n in names if n in get_moe_layer_wise_logging_tracker())
    run_step(chunks, config, local_microbatches(settings), settings)
    reduce_aux_losses_tracker_across_ranks(names)  # what track_moe_metrics does first: per name, PP all-reduce
    tracker = get_moe_layer_wise_logging_tracker()
    values = {n: tracker[n]["values"].tolist() for n in names}
    scalars = megatron_lm.log_specialization_metrics(1, None, None)  # report(): one all-reduce over the world
    return {"names": names, "registered_before_step": registered, "values": values, "scalars": scalars}


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_pipeline_stage_without_moe_layers_reduces_with_the_others():
    from megatron_moe_spec.testing.distributed import ParallelSizes, run_distributed

    stage0, stage1 = run_distributed(_pp_stage_without_moe_layers, world_size=2, parallel=ParallelSizes(pp=2),
                                     timeout=240)
    assert stage0["names"] == ["specialization_loss", "coupling_loss"]
    assert stage0["registered_before_step"] == stage1["registered_before_step"] == sorted(stage0["names"])
    assert stage0["values"] == stage1["values"]
    sp, cp = stage0["values"]["specialization_loss"], stage0["values"]["coupling_loss"]
    assert sp[0] == sp[1] == 0 and sp[2] != 0 and sp[3] != 0  # layers 3, 4 are the MoE layers
    assert cp[2] != 0 and cp[0] == cp[1] == cp[3] == 0  # the one pair (3, 4), indexed by layer 3
    assert stage0["scalars"] == stage1["scalars"] and stage0["scalars"]["moe/routing_entropy"] > 0
