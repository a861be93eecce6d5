"""model.hybrid_layer_pattern in the run configuration: validation (each error names its key and the fix),
the refusal on megatron-core < 0.19, the derived sizes and kwargs, and the shipped *_hybrid.yaml configs.

The validation is pure Python: the cases run in every environment with the installed version pinned to
0.19.2 (``installed_megatron_core_version`` is the one place that reads it); the refusal runs both pinned
to 0.16.1 and, on the 0.16.1 environment, as it is.
"""
import os

import pytest

from megatron_moe_spec import run_config as rc
from megatron_moe_spec.run_config import (
    ConfigError,
    RunConfig,
    count_parameters,
    gpt_model_kwargs,
    hybrid_model_available,
    hybrid_model_kwargs,
    load_run_config,
    megatron_config_kwargs,
)
from conftest import CONFIGS, ROOT, rel, shipped_configs

HYBRID_CONFIGS = shipped_configs("*_hybrid.yaml")
TWINS = {path: path.replace("_hybrid.yaml", ".yaml") for path in HYBRID_CONFIGS}


@pytest.fixture
def mcore_019(monkeypatch):
    monkeypatch.setattr(rc, "installed_megatron_core_version", lambda: "0.19.2")


def _cfg(pattern="*-*E*E", **model):
    values = dict(hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=100, num_moe_experts=4,
                  hybrid_layer_pattern=pattern)
    values.update(model)
    return {"model": values, "training": {"train_iters": 3, "lr": 1e-3}}


def _with(cfg, **sections):
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


# ============================================================ accepted patterns
def test_num_layers_is_derived_and_moe_layers_are_the_E(mcore_019):
    cfg = RunConfig.from_dict(_cfg("*-*E*E"))
    assert cfg.model.is_hybrid and cfg.model.num_layers == 6
    assert cfg.model.moe_layer_indices == [3, 5]
    assert cfg.model.moe_layer_pattern == [0, 0, 0, 1, 0, 1]
    # given explicitly and equal: fine; the resolved form round-trips
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.model.num_layers == 6


def test_transformer_and_hybrid_model_kwargs(mcore_019):
    cfg = RunConfig.from_dict(_with(_cfg("*E*-|*E*E"), parallel={"pp": 2}))
    kw = megatron_config_kwargs(cfg, cpu=True)
    assert kw["num_layers"] == 8 and kw["is_hybrid_model"] is True
    assert kw["moe_layer_freq"] == [0, 1, 0, 0, 0, 1, 0, 1]  # the E, for config-based layer arithmetic
    hk = hybrid_model_kwargs(cfg)
    assert hk == dict(gpt_model_kwargs(cfg), hybrid_layer_pattern="*E*-|*E*E")
    gpt = RunConfig.from_dict(_cfg(None, num_layers=2))
    assert "is_hybrid_model" not in megatron_config_kwargs(gpt, cpu=True)
    with pytest.raises(ValueError, match="hybrid_layer_pattern is null"):
        hybrid_model_kwargs(gpt)


def test_pipe_segments_set_pp_and_vpp(mcore_019):
    RunConfig.from_dict(_with(_cfg("*E|*E"), parallel={"pp": 2}))
    RunConfig.from_dict(_with(_cfg("*E|*E|*E|*E"), parallel={"pp": 2, "vpp": 2}))
    RunConfig.from_dict(_with(_cfg("*E*E*E|*E"), parallel={"pp": 2}))  # uneven segments: megatron allows them


def test_dense_hybrid_model_without_experts(mcore_019):
    cfg = RunConfig.from_dict(_cfg("*-*-", num_moe_experts=None))
    assert not cfg.model.is_moe and cfg.model.moe_layer_indices == []


# ============================================================ errors
ERRORS = {
    "unquoted list": (dict(hybrid_layer_pattern=["*", "E"]), {}, "model.hybrid_layer_pattern",
                      ["must be a string", "quote it"]),
    "unknown symbol": (dict(hybrid_layer_pattern="*X*E"), {}, "model.hybrid_layer_pattern",
                       ["'X' (position 1) is not a layer symbol", "E (MoE)"]),
    "MTP": (dict(hybrid_layer_pattern="*E*E/*E"), {}, "model.hybrid_layer_pattern",
            ["multi-token prediction", "remove the '/...' part"]),
    "MLA": (dict(hybrid_layer_pattern="+E+E"), {}, "model.hybrid_layer_pattern",
            ["multi-latent attention", "use * (attention)"]),
    "DSA": (dict(hybrid_layer_pattern="DEDE"), {}, "model.hybrid_layer_pattern", ["DeepSeek sparse attention"]),
    "no layer": (dict(hybrid_layer_pattern="|"), {}, "model.hybrid_layer_pattern", ["has no layer"]),
    # core.hybrid.check_hybrid_pattern's rule (this machine has no Mamba kernels), before anything is built
    "Mamba without kernels": (dict(hybrid_layer_pattern="*M*E"), {}, "model.hybrid_layer_pattern",
                              ["'M' (Mamba", "mamba_ssm", "install mamba-ssm"]),
    "num_layers differs": (dict(num_layers=4), {}, "model.num_layers",
                           ["differs from the 6 layers", "num_layers: 6 or null"]),
    "E without experts": (dict(num_moe_experts=None), {}, "model.num_moe_experts",
                          ["2 MoE layer(s) (E)", "set the number of experts"]),
    "experts without E": (dict(hybrid_layer_pattern="*-*-"), {}, "model.hybrid_layer_pattern",
                          ["has no MoE layer (E)", "num_moe_experts: null"]),
    "moe_layer_freq": (dict(moe_layer_freq=2), {}, "model.moe_layer_freq",
                       ["not used by HybridModel", "remove moe_layer_freq"]),
    "moe_layer_freq list": (dict(moe_layer_freq=[1, 0, 1, 0, 1, 0]), {}, "model.moe_layer_freq",
                            ["E symbols"]),
    "pipe without pp": (dict(hybrid_layer_pattern="*E|*E"), {}, "model.hybrid_layer_pattern",
                        ["parallel.pp is 1", "remove the |"]),
    "pp without pipe": (dict(hybrid_layer_pattern="*E*E"), {"pp": 2}, "model.hybrid_layer_pattern",
                        ["has no | but parallel.pp is 2", "'*E' + '|' + '*E'"]),
    "segments vs pp": (dict(hybrid_layer_pattern="*E|*E|*E"), {"pp": 2}, "parallel.pp",
                       ["does not divide the 3 pipeline segments"]),
    "empty segment": (dict(hybrid_layer_pattern="*E||*E"), {"pp": 3}, "model.hybrid_layer_pattern",
                      ["segment 1 is empty"]),
    "vpp missing": (dict(hybrid_layer_pattern="*E|*E|*E|*E"), {"pp": 2}, "parallel.vpp",
                    ["make vpp 2", "set parallel.vpp: 2"]),
    "vpp not from pattern": (dict(hybrid_layer_pattern="*E|*E"), {"pp": 2, "vpp": 2}, "parallel.vpp",
                             ["set parallel.vpp: null"]),
    "vpp without pp": (dict(), {"vpp": 2}, "parallel.vpp", ["virtual pipeline stages"]),
}
SPECIALIZATION_ERRORS = {
    "R_cp with one E": (dict(hybrid_layer_pattern="*E*-"), "specialization.cp_coeff",
                        ["1 MoE layer(s)", "E in model.hybrid_layer_pattern"]),
}


@pytest.mark.parametrize("name", sorted(SPECIALIZATION_ERRORS))
def test_specialization_errors_name_the_pattern(mcore_019, name):
    model, key, fragments = SPECIALIZATION_ERRORS[name]
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(_with(_cfg(**model), specialization={"cp_coeff": 1e-3}))
    assert e.value.key == key
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_validation_error_names_the_key_and_the_fix(mcore_019, name):
    model, parallel, key, fragments = ERRORS[name]
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(_with(_cfg(**model), parallel=parallel))
    assert e.value.key == key, str(e.value)
    assert str(e.value).startswith(key + ":"), str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))
    assert "\n" not in str(e.value)


def test_recompute_bound_is_the_shortest_segment(mcore_019):
    full = {"recompute_granularity": "full", "recompute_method": "uniform"}
    ok = _with(_cfg("*E*E*E|*E"), parallel={"pp": 2}, training=dict(full, recompute_num_layers=2))
    with pytest.raises(ConfigError, match="between 1 and the 2 layers per pipeline stage"):
        RunConfig.from_dict(_with(_cfg("*E*E*E|*E"), parallel={"pp": 2},
                                  training=dict(full, recompute_num_layers=3)))
    RunConfig.from_dict(_with(ok, training={"recompute_num_layers": 1}))


def test_unquoted_pattern_in_a_file_gets_a_hint(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hybrid_layer_pattern: *E*E\n")
    with pytest.raises(ConfigError) as e:
        load_run_config([os.path.join(CONFIGS, "tiny_vanilla.yaml"), str(bad)])
    assert "bad.yaml" in str(e.value) and 'must be quoted' in str(e.value)


# ============================================================ megatron-core < 0.19
def _assert_refused(error):
    assert error.key == "model.hybrid_layer_pattern"
    message = str(error)
    assert "needs megatron-core >= 0.19" in message
    assert "pip install 'megatron-core>=0.19,<0.20'" in message
    assert "model.moe_layer_freq" in message  # the GPTModel equivalent


def test_refused_on_megatron_core_0_16(monkeypatch):
    monkeypatch.setattr(rc, "installed_megatron_core_version", lambda: "0.16.1")
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(_cfg())
    _assert_refused(e.value)
    assert "this environment has 0.16.1" in str(e.value)
    # the GPTModel config next to it is fine
    RunConfig.from_dict(_cfg(None, num_layers=2))


@pytest.mark.skipif(hybrid_model_available(), reason="the installed megatron-core has HybridModel (>= 0.19)")
@pytest.mark.parametrize("path", HYBRID_CONFIGS, ids=rel)
def test_shipped_hybrid_configs_are_refused_on_this_megatron_core(path):
    with pytest.raises(ConfigError) as e:
        load_run_config([path])
    _assert_refused(e.value)


# ============================================================ shipped configs
def test_every_architecture_has_a_tiny_and_a_paper_hybrid_config():
    names = {rel(p) for p in HYBRID_CONFIGS}
    assert {"configs/tiny_vanilla_hybrid.yaml", "configs/tiny_deepseek_hybrid.yaml",
            "configs/paper/small_vanilla_hybrid.yaml", "configs/paper/small_deepseek_hybrid.yaml"} <= names


@pytest.mark.parametrize("path", HYBRID_CONFIGS, ids=rel)
def test_shipped_hybrid_config_is_its_gpt_twin_as_a_pattern(mcore_019, path):
    """Each *_hybrid.yaml is the GPT config beside it with every layer written as a pair (*E MoE, *-
    dense): same MoE layers in the same order, same losses, same parameter count."""
    hybrid, gpt = load_run_config([path]), load_run_config([TWINS[path]])
    assert hybrid.model.is_hybrid and not gpt.model.is_hybrid
    pairs = [hybrid.model.hybrid_layer_symbols[i:i + 2] for i in range(0, hybrid.model.num_layers, 2)]
    assert pairs == ["*E" if moe else "*-" for moe in gpt.model.moe_layer_pattern]
    assert count_parameters(hybrid) == count_parameters(gpt)
    assert hybrid.specialization == gpt.specialization and hybrid.parallel == gpt.parallel
    if "deepseek" in path:
        assert hybrid.model.hybrid_layer_symbols.startswith("*-*E")
        assert hybrid.model.moe_shared_expert_intermediate_size is not None


# ============================================================ the parameter count, against a built model
COUNT_SCRIPT = r"""
import json, sys
import torch
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
from megatron.core import parallel_state
parallel_state.initialize_model_parallel(1, 1)
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer import TransformerConfig
from megatron_moe_spec.core.hybrid import get_hybrid_stack_spec
from megatron_moe_spec.run_config import load_run_config, megatron_config_kwargs, hybrid_model_kwargs, count_parameters
out = []
for path, extra in json.loads(sys.argv[1]):
    cfg = load_run_config([path], extra)
    tc = TransformerConfig(**megatron_config_kwargs(cfg, cpu=True))
    spec = get_hybrid_stack_spec(tc, None, hybrid_layer_pattern=cfg.model.hybrid_layer_pattern,
                                 use_transformer_engine=False)  # everything off: megatron's layers
    model = HybridModel(config=tc, hybrid_stack_spec=spec, **hybrid_model_kwargs(cfg))
    out.append([path, extra, sum(p.numel() for p in model.parameters()), count_parameters(cfg).total])
print("RESULT" + json.dumps(out))
"""


@pytest.mark.skipif(not hybrid_model_available(), reason="HybridModel needs megatron-core >= 0.19")
def test_parameter_count_matches_a_built_hybrid_model():
    """count_parameters is exact for HybridModel too: megatron-core's HybridModel built on CPU from the
    local hybrid stack spec (core.hybrid), every layer family of the CPU patterns and the model options."""
    import json
    import socket
    import subprocess
    import sys

    alt = ["model.normalization=LayerNorm", "model.add_bias_linear=true",
           "model.position_embedding_type=learned_absolute", "model.qk_layernorm=true",
           "model.untie_embeddings_and_output_weights=false", "model.swiglu=false",
           "specialization.sp_coeff=0", "model.num_query_groups=4", "model.kv_channels=32"]
    cases = [[os.path.join(CONFIGS, "tiny_vanilla_hybrid.yaml"), []],
             [os.path.join(CONFIGS, "tiny_deepseek_hybrid.yaml"), ["model.moe_shared_expert_gate=true"]],
             [os.path.join(CONFIGS, "tiny_deepseek_hybrid.yaml"), ['model.hybrid_layer_pattern="*-E-*E*-E"']],
             [os.path.join(CONFIGS, "tiny_vanilla_hybrid.yaml"), alt]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", COUNT_SCRIPT, json.dumps(cases)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path, extra, built, counted in json.loads(proc.stdout.split("RESULT", 1)[1]):
        assert built == counted, (rel(path), extra, built, counted)


def test_validate_command_on_a_hybrid_config():
    """``megatron-moe-spec validate``: the parameter count and the resolved pattern on >= 0.19; exit 2 with
    the one-line refusal on older megatron-core."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "megatron_moe_spec", "validate",
                           os.path.join(CONFIGS, "tiny_deepseek_hybrid.yaml")], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    if hybrid_model_available():
        assert proc.returncode == 0, proc.stderr
        assert "# parameters: 486,976 total" in proc.stdout  # = tiny_deepseek.yaml's
        assert "hybrid_layer_pattern: '*-*E*E*E'" in proc.stdout and "num_layers: 8" in proc.stdout
    else:
        assert proc.returncode == 2
        assert proc.stderr.startswith("error: model.hybrid_layer_pattern: HybridModel needs megatron-core >= 0.19")
