"""Run configuration: loading (include / merge / --set), validation messages, the shipped configs,
megatron-core kwargs, the parameter count and the ``validate`` command."""
import glob
import importlib.util
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import yaml

from megatron_moe_spec.run_config import (
    SECTIONS,
    ConfigError,
    RunConfig,
    count_parameters,
    gpt_model_kwargs,
    hybrid_model_available,
    load_run_config,
    lr_scheduler_kwargs,
    megatron_config_kwargs,
    optimizer_config_kwargs,
    transformer_engine_importable,
    validate_for_world_size,
)
from megatron_moe_spec.specialization_config import SpecializationConfig
from conftest import CONFIGS, ROOT, rel, shipped_configs

# The *_hybrid.yaml configs build a HybridModel (megatron-core >= 0.19): on older versions they are refused
# (tests/test_run_config_hybrid.py checks the refusal) and left out here.
RUNNABLE = [p for p in shipped_configs() if hybrid_model_available() or not p.endswith("_hybrid.yaml")]
VARIANTS = sorted(glob.glob(os.path.join(CONFIGS, "variants", "*.yaml")))
TINY = os.path.join(CONFIGS, "tiny_vanilla.yaml")


def write(path, text):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return str(path)


MINIMAL = """
model:
  num_layers: 2
  hidden_size: 32
  num_attention_heads: 4
  seq_length: 16
  vocab_size: 100
  num_moe_experts: 4
training:
  train_iters: 3
  lr: 1.0e-3
"""


# ============================================================ shipped configs
def test_shipped_configs_exist():
    names = {rel(p) for p in RUNNABLE}
    for n in ("tiny_vanilla", "tiny_deepseek", "ci_smoke"):
        assert f"configs/{n}.yaml" in names
    for scale in ("small", "medium", "large"):
        for arch in ("vanilla", "deepseek"):
            assert f"configs/paper/{scale}_{arch}.yaml" in names
    assert {os.path.basename(v)[:-5] for v in VARIANTS} == {
        "lb", "lb_z", "lb_o_v", "lb_sp", "lb_cp", "lb_sp_cp", "lb_z_sp_cp", "lb_sp_cp_x10"}


@pytest.mark.parametrize("path", RUNNABLE, ids=rel)
def test_shipped_config_loads_validates_and_round_trips(path, tmp_path):
    cfg = load_run_config([path])
    assert cfg.model.is_moe
    assert cfg.logging.run_dir == os.path.join("runs", os.path.basename(path)[:-5])
    # the resolved form written to RUN_DIR/config.yaml loads back to the same config
    out = tmp_path / "run" / "config.yaml"
    cfg.save(str(out))
    again = load_run_config([str(out)])
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert yaml.safe_load(out.read_text()) == cfg.to_dict()


@pytest.mark.parametrize("variant", VARIANTS, ids=rel)
@pytest.mark.parametrize("base", RUNNABLE, ids=rel)
def test_every_base_composes_with_every_variant(base, variant):
    cfg = load_run_config([base, variant])
    with open(variant) as f:
        overlay = yaml.safe_load(f)
    # a variant sets only coefficients, and all of them: the base's losses never leak through
    assert set(overlay) == {"model", "specialization"}
    assert set(overlay["model"]) == {"moe_aux_loss_coeff", "moe_z_loss_coeff"}
    assert set(overlay["specialization"]) == {"sp_coeff", "cp_coeff", "ortho_coeff", "var_coeff"}
    for key, value in overlay["specialization"].items():
        assert getattr(cfg.specialization, key) == float(value)
    assert cfg.model.moe_aux_loss_coeff == pytest.approx(1e-2)
    assert cfg.model.moe_z_loss_coeff == (1e-3 if "_z" in os.path.basename(variant) else None)
    # everything else comes from the base
    base_cfg = load_run_config([base])
    assert cfg.model.num_layers == base_cfg.model.num_layers
    assert cfg.parallel == base_cfg.parallel
    assert cfg.logging.run_dir == "runs/" + os.path.basename(base)[:-5] + "+" + os.path.basename(variant)[:-5]


def test_paper_coefficients():
    for path in glob.glob(os.path.join(CONFIGS, "paper", "*.yaml")):
        if path not in RUNNABLE:
            continue
        cfg = load_run_config([path])
        assert cfg.model.moe_aux_loss_coeff == 1e-2
        assert cfg.specialization.sp_coeff == 2e-3
        assert cfg.specialization.cp_coeff == 1e-3
        assert cfg.training.precision == "bf16"
        assert cfg.model.transformer_impl == "transformer_engine"
    z = load_run_config([os.path.join(CONFIGS, "paper", "small_vanilla.yaml"),
                         os.path.join(CONFIGS, "variants", "lb_z_sp_cp.yaml")])
    assert z.model.moe_z_loss_coeff == 1e-3


PAPER_TARGETS = {"small": 0.4e9, "medium": 1.1e9, "large": 7e9}


@pytest.mark.parametrize("scale", sorted(PAPER_TARGETS))
@pytest.mark.parametrize("arch", ["vanilla", "deepseek"])
def test_paper_configs_land_near_their_scale(scale, arch):
    cfg = load_run_config([os.path.join(CONFIGS, "paper", f"{scale}_{arch}.yaml")])
    pc = count_parameters(cfg)
    assert abs(pc.total - PAPER_TARGETS[scale]) / PAPER_TARGETS[scale] < 0.15, pc
    assert pc.active < pc.total / 2
    if arch == "deepseek":
        assert cfg.model.moe_layer_pattern[0] == 0 and all(cfg.model.moe_layer_pattern[1:])
        assert cfg.model.moe_shared_expert_intermediate_size is not None


@pytest.mark.parametrize("scale", sorted(PAPER_TARGETS))
def test_paper_pairs_have_matched_active_size(scale):
    v = count_parameters(load_run_config([os.path.join(CONFIGS, "paper", f"{scale}_vanilla.yaml")]))
    d = count_parameters(load_run_config([os.path.join(CONFIGS, "paper", f"{scale}_deepseek.yaml")]))
    assert abs(v.active - d.active) / v.active < 0.01


def test_ci_smoke_world_sizes():
    cfg = load_run_config([os.path.join(CONFIGS, "ci_smoke.yaml")])
    assert cfg.parallel.tp > 1 and cfg.parallel.ep > 1 and cfg.data.type == "mock"
    s2 = validate_for_world_size(cfg, 2)
    assert (s2.dp, s2.expert_dp, s2.num_microbatches) == (1, 1, 2)
    s4 = validate_for_world_size(cfg, 4)
    assert (s4.dp, s4.expert_dp, s4.num_microbatches) == (2, 2, 1)


# ============================================================ megatron-core kwargs
@pytest.mark.parametrize("path", RUNNABLE, ids=rel)
def test_transformer_config_constructs_cpu_and_gpu(path):
    import torch
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    cfg = load_run_config([path])
    kw = megatron_config_kwargs(cfg, cpu=True)
    tc = TransformerConfig(**kw)
    assert tc.use_cpu_initialization and not tc.gradient_accumulation_fusion
    assert not (tc.bias_activation_fusion or tc.masked_softmax_fusion or tc.apply_rope_fusion)
    assert tc.num_moe_experts == cfg.model.num_moe_experts
    assert tc.moe_router_topk == cfg.model.moe_router_topk
    assert tc.moe_ffn_hidden_size == cfg.model.resolved_moe_ffn_hidden_size
    assert tc.tensor_model_parallel_size == cfg.parallel.tp
    assert tc.expert_model_parallel_size == cfg.parallel.ep
    assert tc.expert_tensor_parallel_size == cfg.parallel.resolved_etp
    assert tc.sequence_parallel == cfg.parallel.sp
    assert tc.gated_linear_unit and tc.activation_func is torch.nn.functional.silu
    assert tc.moe_aux_loss_coeff == cfg.model.moe_aux_loss_coeff
    assert tc.bf16 == (cfg.training.precision == "bf16")

    gpu = megatron_config_kwargs(cfg, cpu=False)
    te = gpu["transformer_impl"] == "transformer_engine"  # model.transformer_impl, auto resolved
    assert te == (cfg.model.transformer_impl == "transformer_engine" or (
        cfg.model.transformer_impl == "auto" and transformer_engine_importable()))
    assert gpu["gradient_accumulation_fusion"] == te
    # masked-softmax fusion (local attention) and persistent layer norm need apex kernels
    assert gpu["masked_softmax_fusion"] == (te or importlib.util.find_spec("scaled_masked_softmax_cuda") is not None)
    assert gpu["persist_layer_norm"] == (te or importlib.util.find_spec("apex") is not None)
    assert gpu["apply_rope_fusion"] == te
    assert gpu["bias_activation_fusion"] and not gpu["use_cpu_initialization"]
    assert gpu["moe_permute_fusion"] == cfg.model.moe_permute_fusion
    # apply_rope_fusion and moe_permute_fusion make TransformerConfig import Transformer Engine
    # kernels at construction; TE is not installed here, so construct without those two.
    gpu_here = dict(gpu, apply_rope_fusion=False, moe_permute_fusion=False)
    TransformerConfig(**gpu_here)
    # the shape options are the same in both modes
    fusion_keys = {"use_cpu_initialization", "gradient_accumulation_fusion", "bias_activation_fusion",
                   "masked_softmax_fusion", "bias_dropout_fusion", "persist_layer_norm",
                   "apply_rope_fusion", "moe_permute_fusion", "transformer_impl", "moe_grouped_gemm"}
    assert {k: v for k, v in kw.items() if k not in fusion_keys} == {
        k: v for k, v in gpu.items() if k not in fusion_keys}
    OptimizerConfig(**optimizer_config_kwargs(cfg))


@pytest.mark.parametrize("path", RUNNABLE, ids=rel)
def test_lr_scheduler_kwargs_construct(path):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class FakeOptimizer:
        param_groups = [{"lr": 0.0, "weight_decay": 0.0}]

    cfg = load_run_config([path])
    sched = OptimizerParamScheduler(FakeOptimizer(), **lr_scheduler_kwargs(cfg))
    sched.step(increment=cfg.training.lr_warmup_iters)
    assert FakeOptimizer.param_groups[0]["lr"] == pytest.approx(cfg.training.lr)
    sched.step(increment=cfg.training.train_iters - cfg.training.lr_warmup_iters)
    assert FakeOptimizer.param_groups[0]["lr"] == pytest.approx(cfg.training.min_lr)


def test_cpu_flag_follows_training_device():
    cpu_cfg = load_run_config([TINY])
    assert megatron_config_kwargs(cpu_cfg)["use_cpu_initialization"] is True
    gpu_cfg = load_run_config([TINY], ["training.device=cuda"])
    assert megatron_config_kwargs(gpu_cfg)["use_cpu_initialization"] is False


def test_kwargs_of_a_dense_model_carry_no_moe_keys():
    from megatron.core.transformer import TransformerConfig

    cfg = load_run_config([TINY], ["model.num_moe_experts=null", "model.moe_ffn_hidden_size=null",
                                   "specialization.sp_coeff=0", "specialization.cp_coeff=0",
                                   "specialization.metrics=false"])
    kw = megatron_config_kwargs(cfg, cpu=True)
    assert not any(k.startswith("moe_") for k in kw if k != "moe_permute_fusion")
    assert TransformerConfig(**kw).num_moe_experts is None


def test_recompute_and_pipeline_kwargs():
    import torch
    from megatron.core.transformer import TransformerConfig

    cfg = load_run_config([TINY], ["parallel.pp=2", "training.recompute_granularity=full",
                                   "training.recompute_method=uniform", "training.recompute_num_layers=1",
                                   "training.precision=bf16"])
    tc = TransformerConfig(**megatron_config_kwargs(cfg, cpu=True))
    assert tc.recompute_granularity == "full" and tc.recompute_method == "uniform"
    assert tc.pipeline_dtype == torch.bfloat16 and tc.params_dtype == torch.bfloat16
    off = megatron_config_kwargs(load_run_config([TINY]), cpu=True)
    assert off["recompute_granularity"] is None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COUNT_SCRIPT = r"""
import os, sys, json
import torch
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
from megatron.core import parallel_state
parallel_state.initialize_model_parallel(1, 1)
from megatron.core.transformer import TransformerConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron_moe_spec.run_config import load_run_config, megatron_config_kwargs, gpt_model_kwargs, count_parameters
single = ["parallel.tp=1", "parallel.sp=false", "parallel.ep=1", "parallel.etp=null",
          # the alltoall dispatcher makes a CUDA stream at construction; the count does not depend on it
          "model.moe_token_dispatcher_type=allgather"]
out = []
for path, extra in json.loads(sys.argv[1]):
    cfg = load_run_config([path], single + extra)
    tc = TransformerConfig(**megatron_config_kwargs(cfg, cpu=True))
    model = GPTModel(config=tc, transformer_layer_spec=get_gpt_decoder_block_spec(tc, use_transformer_engine=False),
                     **gpt_model_kwargs(cfg))
    pc = count_parameters(cfg)
    out.append([path, extra, sum(p.numel() for p in model.parameters()), pc.total])
print("RESULT" + json.dumps(out))
"""


def test_parameter_count_matches_a_built_gpt_model():
    """count_parameters is exact: compare with megatron-core's GPTModel built on CPU (tp = ep = 1)."""
    import json

    alt = ["model.normalization=LayerNorm", "model.add_bias_linear=true",
           "model.position_embedding_type=learned_absolute", "model.qk_layernorm=true",
           "model.untie_embeddings_and_output_weights=false", "model.swiglu=false",
           "specialization.sp_coeff=0", "model.num_query_groups=4", "model.kv_channels=32"]
    cases = [[os.path.join(CONFIGS, "tiny_vanilla.yaml"), []],
             [os.path.join(CONFIGS, "tiny_deepseek.yaml"), ["model.moe_shared_expert_gate=true"]],
             [os.path.join(CONFIGS, "ci_smoke.yaml"), []],
             [os.path.join(CONFIGS, "tiny_vanilla.yaml"), alt]]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", COUNT_SCRIPT, json.dumps(cases)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for path, extra, built, counted in result:
        assert built == counted, (rel(path), extra, built, counted)


def test_gpt_model_kwargs_and_padded_vocab():
    cfg = load_run_config([TINY], ["model.vocab_size=500", "parallel.tp=2", "parallel.sp=true"])
    kw = gpt_model_kwargs(cfg)
    assert kw["vocab_size"] == 512  # next multiple of 64 * tp 2 = 128
    assert kw["max_sequence_length"] == 128
    assert kw["position_embedding_type"] == "rope"
    assert kw["share_embeddings_and_output_weights"] is False


# ============================================================ include / merge / --set
def test_yaml_floats_without_a_dot_are_floats(tmp_path):
    p = write(tmp_path / "a.yaml", MINIMAL + "specialization:\n  sp_coeff: 2e-3\n  cp_coeff: 1E-3\n")
    cfg = load_run_config([p])
    assert cfg.specialization.sp_coeff == 2e-3 and cfg.specialization.cp_coeff == 1e-3


def test_include_relative_to_the_including_file_and_recursive(tmp_path):
    write(tmp_path / "bases" / "deep" / "root.yaml", MINIMAL + "eval:\n  iters: 7\n")
    write(tmp_path / "bases" / "mid.yaml", "include: deep/root.yaml\nmodel:\n  hidden_size: 64\n")
    top = write(tmp_path / "runs" / "top.yaml", "include: ../bases/mid.yaml\ntraining:\n  lr: 5.0e-4\n")
    cwd = os.getcwd()
    os.chdir(ROOT)  # includes do not depend on the working directory
    try:
        cfg = load_run_config([top])
    finally:
        os.chdir(cwd)
    assert cfg.model.hidden_size == 64       # mid over root
    assert cfg.model.num_layers == 2         # from root
    assert cfg.eval.iters == 7
    assert cfg.training.lr == 5e-4           # top over everything
    assert cfg.training.train_iters == 3


def test_include_list_merges_in_order_then_the_file_itself(tmp_path):
    write(tmp_path / "a.yaml", MINIMAL + "eval:\n  iters: 1\n  interval: 11\n")
    write(tmp_path / "b.yaml", "eval:\n  iters: 2\n")
    top = write(tmp_path / "top.yaml", "include: [a.yaml, b.yaml]\neval:\n  interval: 33\n")
    cfg = load_run_config([top])
    assert (cfg.eval.iters, cfg.eval.interval) == (2, 33)


def test_diamond_include_is_not_a_cycle(tmp_path):
    write(tmp_path / "root.yaml", MINIMAL)
    write(tmp_path / "a.yaml", "include: root.yaml\n")
    write(tmp_path / "b.yaml", "include: root.yaml\n")
    top = write(tmp_path / "top.yaml", "include: [a.yaml, b.yaml]\n")
    assert load_run_config([top]).model.num_layers == 2


def test_include_cycle_is_detected(tmp_path):
    write(tmp_path / "a.yaml", MINIMAL + "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: sub/c.yaml\n")
    write(tmp_path / "sub" / "c.yaml", "include: ../a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle") as e:
        load_run_config([str(tmp_path / "a.yaml")])
    assert "a.yaml -> " in str(e.value) and "c.yaml" in str(e.value)
    write(tmp_path / "self.yaml", "include: self.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_run_config([str(tmp_path / "self.yaml")])


def test_missing_include_names_the_including_file(tmp_path):
    top = write(tmp_path / "top.yaml", "include: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml \(included from .*top\.yaml\)"):
        load_run_config([top])


def test_files_merge_left_to_right_deeply(tmp_path):
    a = write(tmp_path / "a.yaml", MINIMAL)
    b = write(tmp_path / "b.yaml", "model:\n  hidden_size: 48\n  moe_layer_freq: [0, 1]\n")
    c = write(tmp_path / "c.yaml", "model:\n  moe_layer_freq: [1, 1]\ntraining:\n  lr: 2.0e-3\n")
    cfg = load_run_config([a, b, c])
    assert cfg.model.hidden_size == 48          # b over a, key by key
    assert cfg.model.num_layers == 2            # a survives under b's model: mapping
    assert cfg.model.moe_layer_freq == [1, 1]   # lists replace, never concatenate
    assert cfg.training.lr == 2e-3 and cfg.training.train_iters == 3
    assert cfg.logging.run_dir == "runs/a+b+c"


def test_set_overrides(tmp_path):
    a = write(tmp_path / "a.yaml", MINIMAL)
    cfg = load_run_config([a], ["training.lr=1e-4", "model.moe_layer_freq=[0, 1]",
                                "logging.wandb_project=proj", "logging.wandb_project=null",
                                "parallel.sp=false", "data.split=98,1,1", "logging.run_dir=/tmp/x"])
    assert cfg.training.lr == 1e-4
    assert cfg.model.moe_layer_freq == [0, 1]
    assert cfg.logging.wandb_project is None     # later --set wins; null parses as None
    assert cfg.data.split == "98,1,1"
    assert cfg.logging.run_dir == "/tmp/x"
    # --set wins over every file
    b = write(tmp_path / "b.yaml", "training:\n  lr: 9.0e-3\n")
    assert load_run_config([a, b], ["training.lr=3e-3"]).training.lr == 3e-3
    # a section absent from every file is created
    assert load_run_config([a], ["checkpoint.save_interval=5"]).checkpoint.save_interval == 5


@pytest.mark.parametrize("override, key, fragment", [
    ("model.num_moe_expert=4", "model.num_moe_expert", "did you mean model.num_moe_experts?"),
    ("modle.hidden_size=4", "modle.hidden_size", "did you mean 'model'?"),
    ("model=3", "model", "model is a section; set one of its keys"),
    ("training.lr", "--set", "expected KEY=VALUE"),
    ("model.a.b=1", "model.a.b", "expected SECTION.KEY=VALUE"),
    ("training.lr=[1, 2", "--set training.lr", "not valid YAML"),
    ("eval.zzzzqq=1", "eval.zzzzqq", "unknown key; the keys of eval: are interval, iters"),
])
def test_set_errors(tmp_path, override, key, fragment):
    a = write(tmp_path / "a.yaml", MINIMAL)
    with pytest.raises(ConfigError) as e:
        load_run_config([a], [override])
    assert e.value.key == key
    assert fragment in str(e.value)


def test_from_dict_and_defaults():
    cfg = RunConfig.from_dict(yaml.safe_load(MINIMAL))
    assert cfg.parallel.tp == 1 and cfg.parallel.resolved_etp == 1
    assert cfg.training.global_batch_size is None
    assert validate_for_world_size(cfg, 3).global_batch_size == 3   # micro_batch_size * dp
    assert isinstance(cfg.specialization, SpecializationConfig) and not cfg.specialization.enabled
    assert cfg.model.resolved_ffn_hidden_size == 128 and cfg.model.moe_layer_indices == [0, 1]
    assert isinstance(cfg.training.lr, float)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


# ============================================================ validation messages
# (overrides on tiny_vanilla, the key the error must carry, fragments the message must contain: the
# problem and the fix)
ERROR_CASES = {
    "wrong type": (["model.hidden_size=abc"], "model.hidden_size", ["must be an integer", "'abc'"]),
    "bool type": (["parallel.sp=1"], "parallel.sp", ["must be true or false"]),
    "float type": (["training.lr=fast"], "training.lr", ["must be a number"]),
    "list type": (["model.moe_layer_freq=[1, a]"], "model.moe_layer_freq",
                  ["an integer or a list of integers"]),
    "choice with suggestion": (["model.normalization=rmsnorm"], "model.normalization",
                               ["must be one of LayerNorm, RMSNorm", "did you mean 'RMSNorm'"]),
    "range": (["training.lr=0"], "training.lr", ["must be > 0"]),
    "negative range": (["eval.interval=-1"], "eval.interval", [">= 0"]),
    "required": (["model.hidden_size=null"], "model.hidden_size", ["is required", "--set model.hidden_size="]),
    "R_sp without swiglu": (["model.swiglu=false"], "specialization.sp_coeff",
                            ["SwiGLU", "model.swiglu: true", "sp_coeff: 0"]),
    "L_o without swiglu": (["model.swiglu=false", "specialization.sp_coeff=0", "specialization.ortho_coeff=1e-3"],
                           "specialization.ortho_coeff", ["model.swiglu: true"]),
    "R_cp with one MoE layer": (["model.moe_layer_freq=[0, 0, 0, 1]"], "specialization.cp_coeff",
                                ["1 MoE layer", "at least two MoE layers", "cp_coeff: 0"]),
    "losses on a dense model": (["model.num_moe_experts=null", "model.moe_ffn_hidden_size=null"],
                                "specialization", ["need an MoE model", "num_moe_experts"]),
    "topk > experts": (["model.moe_router_topk=9"], "model.moe_router_topk", ["top-9 of 8", "<= model.num_moe_experts"]),
    "ep does not divide experts": (["parallel.ep=3"], "parallel.ep", ["does not divide model.num_moe_experts 8"]),
    "ep on a dense model": (["model.num_moe_experts=null", "model.moe_ffn_hidden_size=null",
                             "specialization.sp_coeff=0", "specialization.cp_coeff=0",
                             "specialization.metrics=false", "parallel.ep=2"], "parallel.ep", ["needs an MoE model"]),
    "etp does not divide expert width": (["parallel.etp=3"], "parallel.etp", ["does not divide the expert width 128"]),
    "etp != tp needs ep > 1": (["parallel.tp=1", "parallel.sp=false", "parallel.ep=1", "parallel.etp=2"],
                               "parallel.etp", ["etp=2 differs from tp=1 with ep=1", "use ep > 1"]),
    "tp does not divide heads": (["parallel.tp=3", "parallel.sp=true", "parallel.etp=1"], "parallel.tp",
                                 ["does not divide model.num_attention_heads 4"]),
    "tp vs query groups": (["model.num_attention_heads=12", "model.kv_channels=16", "model.num_query_groups=6",
                            "parallel.tp=4", "parallel.sp=true"], "parallel.tp", ["one must divide the other"]),
    "heads vs groups": (["model.num_query_groups=3"], "model.num_query_groups", ["multiple of num_query_groups"]),
    "tp with MoE needs sp": (["parallel.tp=2"], "parallel.sp", ["MoELayer refuses", "parallel.sp: true"]),
    "sp without tp": (["parallel.sp=true"], "parallel.sp", ["needs tensor parallel", "parallel.sp: false"]),
    "pp does not divide layers": (["parallel.pp=3"], "parallel.pp", ["does not divide model.num_layers 4"]),
    "vpp without pp": (["parallel.vpp=2"], "parallel.vpp", ["needs pp > 1"]),
    "flex dispatcher": (["model.moe_token_dispatcher_type=flex"], "model.moe_token_dispatcher_type",
                        ["not supported", "use alltoall"]),
    "top-1 softmax": (["model.moe_router_topk=1"], "model.moe_router_pre_softmax",
                      ["model.moe_router_pre_softmax: true"]),
    "expert bias needs sigmoid": (["model.moe_router_enable_expert_bias=true"], "model.moe_router_enable_expert_bias",
                                  ["moe_router_score_function: sigmoid"]),
    "group routing half set": (["model.moe_router_num_groups=2"], "model.moe_router_group_topk", ["set both"]),
    "group topk > groups": (["model.moe_router_num_groups=2", "model.moe_router_group_topk=4"],
                            "model.moe_router_group_topk", ["> 2 groups"]),
    "moe_layer_freq list length": (["model.moe_layer_freq=[1, 1]"], "model.moe_layer_freq", ["4 entries"]),
    "load balancing list": (["model.moe_router_load_balancing_type=[aux_loss, seq_aux_loss]"],
                            "model.moe_aux_loss_coeff", ["list of 2 coefficients"]),
    "load balancing type": (["model.moe_router_load_balancing_type=aux_los"], "model.moe_router_load_balancing_type",
                            ["did you mean 'aux_loss'"]),
    "sinkhorn with aux loss": (["model.moe_router_load_balancing_type=sinkhorn"], "model.moe_aux_loss_coeff",
                               ["sinkhorn", "set it to 0"]),
    "capacity with sinkhorn": (["model.moe_router_load_balancing_type=sinkhorn", "model.moe_aux_loss_coeff=0",
                                "model.moe_expert_capacity_factor=1.5"], "model.moe_expert_capacity_factor",
                               ["token dropping"]),
    "pad without capacity": (["model.moe_pad_expert_input_to_capacity=true"],
                             "model.moe_pad_expert_input_to_capacity", ["needs model.moe_expert_capacity_factor"]),
    "shared overlap without alltoall": (["model.moe_shared_expert_intermediate_size=64",
                                         "model.moe_shared_expert_overlap=true",
                                         "model.moe_token_dispatcher_type=allgather"],
                                        "model.moe_shared_expert_overlap", ["alltoall"]),
    "bias with shared expert": (["model.moe_shared_expert_intermediate_size=64", "model.add_bias_linear=true"],
                                "model.add_bias_linear", ["shared expert has no biases"]),
    "moe key on dense model": (["model.num_moe_experts=null"], "model.moe_ffn_hidden_size",
                               ["num_moe_experts is null"]),
    "global batch vs micro batch": (["training.global_batch_size=10"], "training.global_batch_size",
                                    ["not divisible by training.micro_batch_size 4"]),
    "min_lr > lr": (["training.min_lr=1"], "training.min_lr", ["lower min_lr"]),
    "warmup >= decay": (["training.lr_warmup_iters=300"], "training.lr_warmup_iters",
                        ["fewer than the 300 decay steps"]),
    "full recompute needs method": (["training.recompute_granularity=full"], "training.recompute_method",
                                    ["uniform or block"]),
    "full recompute num layers": (["training.recompute_granularity=full", "training.recompute_method=block"],
                                  "training.recompute_num_layers", ["between 1 and the 4 layers"]),
    "selective with num layers": (["training.recompute_granularity=selective", "training.recompute_num_layers=2"],
                                  "training.recompute_num_layers", ["must be null with selective"]),
    "recompute module name": (["training.recompute_granularity=selective", "training.recompute_modules=[mo]"],
                              "training.recompute_modules", ["did you mean 'moe'"]),
    "moe_act needs grouped gemm": (["training.recompute_granularity=selective",
                                    "training.recompute_modules=[moe_act]"], "training.recompute_modules",
                                   ["moe_grouped_gemm"]),
    "recompute keys without recompute": (["training.recompute_method=uniform"], "training.recompute_method",
                                         ["recompute_granularity is none"]),
    "grouped gemm on the local spec": (["model.transformer_impl=local", "model.moe_grouped_gemm=true"],
                                       "model.moe_grouped_gemm", ["legacy GroupedMLP", "moe_grouped_gemm: auto"]),
    "grouped gemm choice": (["model.moe_grouped_gemm=1"], "model.moe_grouped_gemm",
                            ["must be one of false, true, auto"]),
    "data split": (["data.split=90,10"], "data.split", ["three non-negative"]),
    "mock with paths": (["data.paths=[x]"], "data.paths", ["data.type is mock"]),
    "indexed without paths": (["data.type=indexed"], "data.paths", ["at least one dataset prefix"]),
    "indexed without tokenizer": (["data.type=indexed", "data.paths=[x]"], "data.tokenizer_path",
                                  ["set data.tokenizer_path"]),
    "missing data path": (["data.type=indexed", "data.paths=[/nonexistent/corpus]", "data.tokenizer_path=/tmp"],
                          "data.paths[0]", ["missing data path", "/nonexistent/corpus.bin", "prepare-data"]),
    "missing checkpoint": (["checkpoint.resume=/nonexistent/ckpt"], "checkpoint.resume", ["does not exist"]),
    "specialization value": (["specialization.sp_coeff=-1"], "specialization.sp_coeff", ["must be >= 0"]),
    "specialization choice": (["specialization.cp_form=sum"], "specialization.cp_form", ["product, log"]),
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_validation_error_names_the_key_and_the_fix(name):
    overrides, key, fragments = ERROR_CASES[name]
    with pytest.raises(ConfigError) as e:
        load_run_config([TINY], overrides)
    assert isinstance(e.value, ValueError)
    assert e.value.key == key, str(e.value)
    assert key in str(e.value)
    for frag in fragments:
        assert frag in str(e.value), (frag, str(e.value))
    assert "\n" not in str(e.value)  # one message


@pytest.mark.parametrize("text, key, fragments", [
    ("model:\n  num_expert: 4\n", "model.num_expert", ["unknown key model.num_expert",
                                                       "did you mean model.num_moe_experts?"]),
    ("model:\n  tp: 2\n", "model.tp", ["did you mean parallel.tp?"]),
    ("trainig:\n  lr: 1\n", "trainig", ["unknown section 'trainig'", "did you mean 'training'?"]),
    ("num_layers: 2\n", "num_layers", ["belongs to the model: section"]),
    ("specialization:\n  sp_coef: 1\n", "specialization.sp_coef", ["did you mean specialization.sp_coeff?"]),
    ("model: 3\n", "model", ["must be a mapping"]),
    ("- a\n- b\n", None, ["must be a mapping of sections"]),
    ("model: [\n", None, ["not valid YAML"]),
    ("include: 3\n", "include", ["include must be a file path or a list"]),
])
def test_file_errors_name_the_file_and_the_key(tmp_path, text, key, fragments):
    bad = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_run_config([TINY, bad])
    if key is not None:
        assert e.value.key == key
    assert "bad.yaml" in str(e.value)
    for frag in fragments:
        assert frag in str(e.value), (frag, str(e.value))


def test_indexed_data_with_existing_files_validates(tmp_path):
    for name in ("web", "code"):
        for ext in (".bin", ".idx"):
            (tmp_path / f"{name}_text_document{ext}").write_bytes(b"")
    tok = write(tmp_path / "tokenizer.json", "{}")
    paths = f"[{tmp_path}/web_text_document, {tmp_path}/code_text_document]"
    cfg = load_run_config([TINY], ["data.type=indexed", f"data.paths={paths}", f"data.tokenizer_path={tok}",
                                   "data.domain_labels=true", "data.weights=[0.7, 0.3]"])
    assert cfg.data.paths[1].endswith("code_text_document") and cfg.data.weights == [0.7, 0.3]
    # without the .idx file: the error names the exact missing file
    os.remove(tmp_path / "code_text_document.idx")
    with pytest.raises(ConfigError, match=r"data\.paths\[1\]: missing data path: .*code_text_document\.idx"):
        load_run_config([TINY], ["data.type=indexed", f"data.paths={paths}", f"data.tokenizer_path={tok}"])
    # check_paths=False skips the filesystem (e.g. validating on a login node)
    load_run_config([TINY], ["data.type=indexed", f"data.paths={paths}", f"data.tokenizer_path={tok}"],
                    check_paths=False)


def test_world_size_checks():
    cfg = load_run_config([os.path.join(CONFIGS, "ci_smoke.yaml")])
    with pytest.raises(ConfigError) as e:
        validate_for_world_size(cfg, 3)
    assert e.value.key == "parallel" and "not divisible by tp*pp*cp = 2*1*1 = 2" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate_for_world_size(cfg, 6)  # dp 3: global batch 4 is not a multiple of 2 * 3
    assert e.value.key == "training.global_batch_size"
    assert "micro_batch_size * dp = 2*3 = 6" in str(e.value)


def test_world_size_interleaved_schedule_needs_microbatches_multiple_of_pp():
    cfg = load_run_config([TINY], ["parallel.pp=2", "parallel.vpp=2", "training.global_batch_size=12"])
    with pytest.raises(ConfigError) as e:
        validate_for_world_size(cfg, 2)  # dp 1: 3 micro-batches of 4, not a multiple of pp 2
    assert e.value.key == "training.global_batch_size"
    assert "multiple of pp=2" in str(e.value) and "multiple of 8" in str(e.value)
    assert validate_for_world_size(load_run_config([TINY], ["parallel.pp=2", "parallel.vpp=2"]), 2).num_microbatches == 2


def test_world_size_expert_groups():
    cfg = load_run_config([os.path.join(CONFIGS, "paper", "large_vanilla.yaml")])
    with pytest.raises(ConfigError) as e:
        validate_for_world_size(cfg, 24)  # tp*pp = 8 divides 24, but etp*ep*pp = 16 does not
    assert e.value.key == "parallel.ep" and "etp*ep*pp = 1*8*2 = 16" in str(e.value)
    s = validate_for_world_size(cfg, 32)
    assert (s.dp, s.expert_dp, s.num_microbatches) == (4, 2, 256)
    with pytest.raises(ConfigError, match="positive integer"):
        validate_for_world_size(cfg, 0)


def test_warnings_are_not_errors():
    cfg = load_run_config([TINY], ["training.precision=bf16", "model.moe_router_topk=1",
                                   "model.moe_router_pre_softmax=true"])
    text = " | ".join(cfg.warnings())
    assert "training.precision: bf16 on CPU" in text
    assert "R_sp is 0" in text


def test_direct_construction_is_validated_too():
    from megatron_moe_spec.run_config import ModelConfig, TrainingConfig

    cfg = RunConfig(model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8,
                                      vocab_size=64, num_moe_experts=4, moe_router_topk=2),
                    training=TrainingConfig(train_iters=1, lr=1))
    cfg.validate()
    assert cfg.training.lr == 1.0 and isinstance(cfg.training.lr, float)
    cfg.model.moe_router_topk = 5
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert e.value.key == "model.moe_router_topk"


# ============================================================ CLI
def run_cli(argv, capsys):
    from megatron_moe_spec.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_validate_good_config_prints_resolved_yaml(capsys):
    code, out, err = run_cli(["validate", TINY, os.path.join(CONFIGS, "variants", "lb_z.yaml"),
                              "--set", "training.lr=5e-4"], capsys)
    assert code == 0, err
    resolved = yaml.safe_load(out)
    expected = load_run_config([TINY, os.path.join(CONFIGS, "variants", "lb_z.yaml")], ["training.lr=5e-4"])
    assert resolved == expected.to_dict()
    assert "# parameters:" in out


def test_cli_validate_world_size(capsys):
    code, out, err = run_cli(["validate", os.path.join(CONFIGS, "ci_smoke.yaml"), "--world-size", "4"], capsys)
    assert code == 0, err
    assert "dp 2" in out and "expert dp 2" in out
    code, out, err = run_cli(["validate", os.path.join(CONFIGS, "ci_smoke.yaml"), "--world-size", "3"], capsys)
    assert code == 2 and err.startswith("error: parallel: world size 3")


@pytest.mark.parametrize("extra, fragment", [
    (["--set", "model.num_moe_expert=4"], "did you mean model.num_moe_experts?"),
    (["--set", "parallel.tp=2"], "parallel.sp: tp=2 with MoE layers needs sequence parallel"),
    (["--set", "data.type=indexed", "--set", "data.paths=[/nonexistent/x]", "--set", "data.tokenizer_path=/tmp"],
     "missing data path"),
])
def test_cli_validate_errors_exit_2_without_traceback(capsys, extra, fragment):
    code, out, err = run_cli(["validate", TINY] + extra, capsys)
    assert code == 2
    assert err.startswith("error: ") and fragment in err
    assert "Traceback" not in err and out == ""


def test_cli_wrong_yaml_key_in_a_file(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "model:\n  moe_router_top_k: 4\n")
    code, out, err = run_cli(["validate", TINY, bad], capsys)
    assert code == 2
    assert "unknown key model.moe_router_top_k; did you mean model.moe_router_topk?" in err


def test_cli_in_a_subprocess():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    bad = subprocess.run([sys.executable, "-m", "megatron_moe_spec.cli", "validate", TINY,
                          "--set", "model.moe_router_topk=9"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: model.moe_router_topk: top-9 of 8 experts is impossible; set "
                                  "moe_router_topk <= model.num_moe_experts")
    good = subprocess.run([sys.executable, "-m", "megatron_moe_spec", "validate", "configs/tiny_deepseek.yaml"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert good.returncode == 0, good.stderr
    assert yaml.safe_load(good.stdout)["model"]["moe_layer_freq"] == [0, 1, 1, 1]
    # validate must not import torch or megatron (fast, works on a login node)
    probe = subprocess.run([sys.executable, "-c",
                            "import sys; from megatron_moe_spec.cli import main; "
                            "rc = main(['validate', 'configs/tiny_vanilla.yaml']); "
                            "print('LOADED', 'torch' in sys.modules, 'megatron' in sys.modules, file=sys.stderr)"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert "LOADED False False" in probe.stderr


def test_cli_usage(capsys):
    code, out, err = run_cli([], capsys)
    assert code == 2 and "validate" in err
    code, out, err = run_cli(["--help"], capsys)
    assert code == 0 and "validate" in out
    code, out, err = run_cli(["validate"], capsys)
    assert code == 2 and "CONFIG" in err
    code, out, err = run_cli(["no-such-command"], capsys)
    assert code == 2


def test_subcommand_modules_follow_the_contract():
    import importlib

    from megatron_moe_spec.cli import SUBCOMMANDS

    assert "validate" in SUBCOMMANDS
    for name, module_path in SUBCOMMANDS.items():
        module = importlib.import_module(module_path)
        assert isinstance(module.HELP, str) and module.HELP
        assert callable(module.add_arguments) and callable(module.run)


# ============================================================ docs
def test_every_key_is_documented():
    import dataclasses

    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        doc = f.read()
    for section, cls in SECTIONS.items():
        assert f"`{section}`" in doc
        for fld in dataclasses.fields(cls):
            assert f"`{fld.name}`" in doc, f"{section}.{fld.name} missing from docs/configuration.md"


def test_docs_tables_are_generated_from_the_schema():
    from megatron_moe_spec.run_config import reference_markdown

    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        doc = f.read()
    assert reference_markdown() in doc, (
        "docs/configuration.md is stale: paste megatron_moe_spec.run_config.reference_markdown() "
        "between the GENERATED markers")
