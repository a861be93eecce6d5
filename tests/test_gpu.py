"""GPU checks (marker ``gpu``; scripts/gpu_check.sh runs them on one GPU, docs/gpu.md), and the parts
of them that also run on CPU, as ordinary tests.

- the GPU smoke config (configs/ci_smoke_gpu.yaml) validates, resolves its backend (Transformer Engine
  when it imports, local otherwise) and is refused with a clear error where it cannot run;
- the captured SwiGLU intermediate z equals an independent silu(x W_gate) * (x W_up) from the MoE
  layer's input and the expert weights: local experts (SequentialMLP) on CPU and on CUDA, and
  ``TEGroupedMLP`` on CUDA when Transformer Engine is installed;
- the losses in bf16 against an fp32 reference: the pure functions (bf16 inputs vs. the same values
  in fp32) and the whole model (bf16 through megatron's ``Float16Module`` vs. the fp32 model with
  the same weights), on CPU and on CUDA;
- one NCCL rank of the smoke config through scripts/pretrain.sh (torchrun): every loss and metric
  logged and finite, the LM loss decreasing, checkpoints written (a CPU variant is ``slow``);
- peak GPU memory (``torch.cuda.max_memory_allocated``) of a training step with and without the
  losses.

Without CUDA the ``gpu`` tests are skipped, each with its reason. With ``MMS_GPU_REPORT_DIR`` set, the
measured numbers are written there as JSON (scripts/gpu_check.sh puts them in its report).
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_moe_spec.run_config import (
    ConfigError, load_run_config, megatron_config_kwargs, resolve_backend, transformer_engine_importable,
    validate_for_world_size)
from megatron_moe_spec.specialization_config import SpecializationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_SMOKE = os.path.join(ROOT, "configs", "ci_smoke_gpu.yaml")

CUDA = torch.cuda.is_available()
TE = CUDA and transformer_engine_importable()
NO_CUDA = ("no CUDA device on this machine: a GPU check, run on a GPU by scripts/gpu_check.sh "
           "(docs/gpu.md)")
NO_TE = ("Transformer Engine is not installed (transformer_engine.pytorch does not import), so "
         "TEGroupedMLP cannot be built; install transformer-engine[pytorch] on the GPU machine")
needs_cuda = pytest.mark.skipif(not CUDA, reason=NO_CUDA)
needs_te = pytest.mark.skipif(not TE, reason=NO_CUDA if not CUDA else NO_TE)
GPU = [pytest.mark.gpu, needs_cuda]
# megatron-core puts some tensors on the GPU whenever CUDA is present (the MoE tracker, ...), so the CPU
# variants run on machines without CUDA only, as the rest of the suite does (docs/cpu_backend.md).
CPU_ONLY = pytest.mark.skipif(CUDA, reason="CUDA is present: the cuda variant of this test runs instead")
DEVICES = [pytest.param("cpu", marks=CPU_ONLY), pytest.param("cuda", marks=GPU)]

AUX_LOSSES = ["load_balancing_loss", "z_loss", "specialization_loss", "coupling_loss",
              "orthogonality_loss", "variance_loss"]
OUR_LOSSES = ["specialization_loss", "coupling_loss", "orthogonality_loss", "variance_loss"]
METRICS = ["routing_entropy", "topk_mass", "load_cv", "max_vio", "dead_experts", "token_expert_mi",
           "coactivation", "activation_similarity", "pathway_nmi", "domain_mi"]
ALL_ON = SpecializationConfig(sp_coeff=0.5, cp_coeff=0.5, ortho_coeff=0.5, var_coeff=0.5)

pytestmark = pytest.mark.timeout(600)


def write_report(name: str, values: dict) -> None:
    """Measured numbers for scripts/gpu_check.sh's report (``$MMS_GPU_REPORT_DIR/NAME.json``)."""
    directory = os.environ.get("MMS_GPU_REPORT_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"{name}.json"), "w") as f:
            json.dump(values, f, indent=1, sort_keys=True)


@contextlib.contextmanager
def megatron_world(device: str):
    """A world of one process with megatron's parallel state: gloo + the CPU backend on CPU, NCCL on
    CUDA (tests/conftest.py's fixture, for either device); torn down afterwards."""
    import datetime

    import torch.distributed as dist

    from megatron_moe_spec import cpu
    from megatron_moe_spec.testing.distributed import ParallelSizes, free_port, init_megatron, teardown_megatron

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    if device == "cuda":
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))
    init_megatron(0, 1, ParallelSizes())  # gloo unless already initialized; the CPU backend stays off on CUDA
    try:
        yield
    finally:
        teardown_megatron()
        cpu.disable()


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# ============================================================================ the smoke config (CPU)
def test_gpu_smoke_config_validates_with_every_loss_and_metric_on():
    cfg = load_run_config([GPU_SMOKE])
    sizes = validate_for_world_size(cfg, 1)
    assert (sizes.tp, sizes.pp, sizes.ep, sizes.dp, sizes.num_microbatches) == (1, 1, 1, 1, 2)
    t, m, s = cfg.training, cfg.model, cfg.specialization
    assert t.device == "cuda" and t.precision == "bf16"
    assert 20 <= t.train_iters <= 60  # a few dozen steps
    assert m.transformer_impl == "auto" and m.moe_grouped_gemm == "auto"
    assert all(getattr(s, c) > 0 for c in ("sp_coeff", "cp_coeff", "ortho_coeff", "var_coeff"))
    assert s.metrics and s.metrics_interval == 1
    assert m.moe_aux_loss_coeff > 0 and m.moe_z_loss_coeff > 0
    assert len(m.moe_layer_indices) >= 2  # R_cp has pairs
    # the resolved file loads back to the same config (what the run writes to RUN_DIR/config.yaml)
    assert load_run_config([GPU_SMOKE]).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("te_importable", [True, False])
def test_gpu_smoke_config_picks_the_te_spec_only_when_te_imports(monkeypatch, te_importable):
    import megatron_moe_spec.run_config as rc

    monkeypatch.setattr(rc, "transformer_engine_importable", lambda: te_importable)
    cfg = load_run_config([GPU_SMOKE])
    expected = ("transformer_engine", True) if te_importable else ("local", False)
    assert resolve_backend(cfg, cpu=False) == expected
    assert resolve_backend(cfg, cpu=True) == ("local", False)  # never TE on CPU
    kw = megatron_config_kwargs(cfg, cpu=False)
    assert (kw["transformer_impl"], kw["moe_grouped_gemm"]) == expected
    assert kw["bf16"] and kw["params_dtype"] is torch.bfloat16
    assert kw["gradient_accumulation_fusion"] == te_importable
    # an explicit choice is kept as it is
    assert resolve_backend(load_run_config([GPU_SMOKE], ["model.transformer_impl=local"]), cpu=False) == (
        "local", False)


def test_gpu_smoke_config_builds_a_transformer_config_without_te_or_apex():
    """What a CUDA machine without Transformer Engine or apex builds: the local spec, and no fusion
    that needs apex kernels (megatron's torch norm asserts persist_layer_norm off)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if TE:
        pytest.skip("Transformer Engine is installed here: the no-TE configuration is not what runs")
    cfg = load_run_config([GPU_SMOKE])
    kw = megatron_config_kwargs(cfg, cpu=False)
    assert kw["transformer_impl"] == "local" and not kw["moe_grouped_gemm"]
    has_apex = _importable("apex")
    assert kw["persist_layer_norm"] == has_apex
    assert kw["masked_softmax_fusion"] == _importable("scaled_masked_softmax_cuda")
    config = TransformerConfig(**kw)
    assert config.bf16 and config.params_dtype is torch.bfloat16 and config.moe_router_dtype == "fp32"


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_gpu_smoke_config_is_refused_where_it_cannot_run(monkeypatch):
    import megatron_moe_spec.run_config as rc
    from megatron_moe_spec.commands.train import check_backend, preflight

    monkeypatch.setenv("WORLD_SIZE", "1")
    if not CUDA:
        with pytest.raises(ConfigError) as e:
            preflight([GPU_SMOKE], [])
        assert e.value.key == "training.device" and "CUDA is not available" in str(e.value)
        with pytest.raises(ConfigError) as e:
            preflight([GPU_SMOKE], ["training.device=auto"])
        assert e.value.key == "training.precision"
    # without Transformer Engine: an explicit transformer_engine, or grouped GEMM on the local spec
    monkeypatch.setattr(rc, "transformer_engine_importable", lambda: False)
    with pytest.raises(ConfigError) as e:
        check_backend(load_run_config([GPU_SMOKE], ["model.transformer_impl=transformer_engine"]), on_cpu=False)
    assert e.value.key == "model.transformer_impl" and "pip install transformer-engine" in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_backend(load_run_config([GPU_SMOKE], ["model.moe_grouped_gemm=true"]), on_cpu=False)
    assert e.value.key == "model.moe_grouped_gemm" and "legacy GroupedMLP" in str(e.value)
    check_backend(load_run_config([GPU_SMOKE]), on_cpu=False)  # auto: the local spec, fine


# ============================================================================ R_sp's capture of z
def expert_weights(experts, e):
    """Expert e's fc1 weight [2F, H] (gate rows first, then up) from either expert module."""
    local = getattr(experts, "local_experts", None)
    if local is not None:  # SequentialMLP
        return local[e].linear_fc1.weight
    return getattr(experts.linear_fc1, f"weight{e}")  # TEGroupedMLP: TE's GroupedLinear weight0..E-1


@torch.no_grad()
def independent_z(x_TH, routing_map_TE, experts, F: int) -> torch.Tensor:
    """[T, k, F] z = silu(x W_gate) * (x W_up) of each token's experts in ascending expert order, in
    float64, from the weights alone (no megatron code)."""
    x = x_TH.double()
    T, E = routing_map_TE.shape
    k = int(routing_map_TE.sum(1).max())
    slot_TE = torch.cumsum(routing_map_TE.long(), dim=1) - 1
    z = torch.zeros(T, k, F, dtype=torch.float64, device=x.device)
    for e in range(E):
        h = x @ expert_weights(experts, e).double().t()
        z_e = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
        tokens = routing_map_TE[:, e].nonzero(as_tuple=True)[0]
        z[tokens, slot_TE[tokens, e]] = z_e[tokens]
    return z


CAPTURE_CASES = [
    pytest.param("local", "cpu", id="SequentialMLP-cpu", marks=CPU_ONLY),
    pytest.param("local", "cuda", id="SequentialMLP-cuda", marks=GPU),
    pytest.param("te", "cuda", id="TEGroupedMLP-cuda", marks=[pytest.mark.gpu, needs_cuda, needs_te]),
]


@pytest.mark.parametrize("impl,device", CAPTURE_CASES)
def test_captured_z_equals_independent_swiglu(monkeypatch, impl, device):
    """The z that R_sp receives, row by row, against silu(x W_gate) * (x W_up) recomputed from the MoE
    layer's input, the routing map and the expert weights (fp32 model; float64 reference)."""
    from megatron_moe_spec import losses
    from megatron_moe_spec.core.layer_specs import get_moe_block_spec
    from megatron_moe_spec.core.moe_layer import SpecializationMoELayer
    from megatron_moe_spec.testing.tiny_gpt import (
        TinyGPTSettings, build_model, build_transformer_config, global_microbatches)

    extra = {"transformer_impl": "transformer_engine" if impl == "te" else "local"}
    if impl == "te":
        extra["moe_grouped_gemm"] = True
    if device == "cuda":
        extra["use_cpu_initialization"] = False
    settings = TinyGPTSettings(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                               micro_batch_size=2, seq_length=16, moe_aux_loss_coeff=0.0,
                               extra_config=extra)
    captured = []
    original = losses.specialization_loss

    def spy(z_TKF, *args, **kwargs):
        captured.append(z_TKF.detach().clone())
        return original(z_TKF, *args, **kwargs)

    monkeypatch.setattr(losses, "specialization_loss", spy)
    with megatron_world(device):
        config = build_transformer_config(settings)
        torch.manual_seed(1234)
        spec_fn = functools.partial(get_moe_block_spec, spec_config=SpecializationConfig(sp_coeff=0.5),
                                    use_transformer_engine=impl == "te")
        model = build_model(config, settings, spec_fn, wrap_ddp=False)[0].to(device)
        model.train()
        moe_layers = [m for m in model.modules() if isinstance(m, SpecializationMoELayer)]
        expected_experts = "TEGroupedMLP" if impl == "te" else "SequentialMLP"
        assert [type(m.experts).__name__ for m in moe_layers] == [expected_experts] * settings.num_layers
        inputs, maps = {}, {}
        hooks = [m.register_forward_pre_hook(
            functools.partial(lambda i, mod, args, kw: inputs.__setitem__(
                i, (args[0] if args else kw["hidden_states"]).detach()), i), with_kwargs=True)
            for i, m in enumerate(moe_layers)]
        hooks += [m.router.register_forward_hook(
            functools.partial(lambda i, mod, args, out: maps.__setitem__(i, out[1].detach()), i))
            for i, m in enumerate(moe_layers)]
        batch = to_device(global_microbatches(settings, 1)[0], device)
        model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
              labels=batch["labels"])
        for h in hooks:
            h.remove()

        assert len(captured) == len(moe_layers)
        # fp32 model; TE may run fp32 GEMMs in TF32 (10-bit mantissa). A z that is still gated, or a row
        # in the wrong slot, is off by tens of percent.
        tol = {"cpu": 1e-5, "cuda": 1e-3}[device] if impl == "local" else 1e-2
        worst = 0.0
        for i, m in enumerate(moe_layers):
            H = inputs[i].shape[-1]
            z_ref = independent_z(inputs[i].reshape(-1, H), maps[i], m.experts, config.moe_ffn_hidden_size)
            z = captured[i].double()
            assert z.shape == z_ref.shape, (z.shape, z_ref.shape)
            err = float((z - z_ref).abs().max() / z_ref.abs().max())
            worst = max(worst, err)
            assert err <= tol, (i, err)
    write_report(f"capture_{impl}_{device}", {"experts": expected_experts, "max_rel_error": worst,
                                              "tolerance": tol})


# ============================================================================ bf16 against fp32
@pytest.mark.parametrize("device", DEVICES)
def test_pure_losses_in_bf16_match_fp32_of_the_same_values(device):
    """bf16 inputs give the fp32 value of the same (rounded) numbers: the losses accumulate in fp32."""
    from megatron_moe_spec import losses

    g = torch.Generator().manual_seed(5)
    T, K, F, E = 96, 2, 64, 8
    z = torch.randn(T, K, F, generator=g).bfloat16().to(device)
    valid = (torch.rand(T, generator=g) > 0.1).to(device)
    probs = torch.randn(T, E, generator=g).softmax(-1).bfloat16().to(device)
    idx = probs.float().topk(K).indices
    next_probs = torch.randn(T, E, generator=g).softmax(-1).bfloat16().to(device)
    next_idx = next_probs.float().topk(K).indices
    gates = torch.zeros_like(probs).scatter(1, idx, probs.gather(1, idx))
    cases = {
        "specialization_loss": lambda t: losses.specialization_loss(t["z"], valid),
        "orthogonality_loss": lambda t: losses.orthogonality_loss(t["z"], valid),
        "coupling_loss": lambda t: losses.coupling_loss(t["p"], idx, t["q"], next_idx, valid),
        "variance_loss": lambda t: losses.variance_loss(t["g"], valid),
    }
    results = {}
    for name, fn in cases.items():
        low = {"z": z.clone().requires_grad_(True), "p": probs.clone().requires_grad_(True),
               "q": next_probs, "g": gates.clone().requires_grad_(True)}
        ref = {k: v.detach().float().requires_grad_(v.requires_grad) for k, v in low.items()}
        a, b = fn(low), fn(ref)
        assert a.dtype == torch.float32 and a.device.type == device
        rel = abs(float(a.detach()) - float(b.detach())) / max(abs(float(b.detach())), 1e-12)
        assert rel <= 1e-5, (name, float(a), float(b))
        a.backward()
        b.backward()
        for key in ("z", "p", "g"):
            if ref[key].grad is None:
                continue
            grad_low, grad_ref = low[key].grad.float(), ref[key].grad
            # one bf16 rounding of the fp32 gradient (relative 2^-8), on top of its own scale
            bound = 2.0 ** -8 * grad_ref.abs() + 1e-6 * float(grad_ref.abs().max())
            assert bool(((grad_low - grad_ref).abs() <= bound).all()), (name, key)
        results[name] = rel
    write_report(f"bf16_pure_{device}", {"max_rel_value_error": results})


def _model_losses(settings, config, spec, state, device, batch):
    """Forward + backward of one micro-batch; returns {loss name: per-layer values} and the LM loss."""
    from megatron_moe_spec.core.layer_specs import get_moe_block_spec
    from megatron_moe_spec.testing.tiny_gpt import build_model, tracker_values

    model = build_model(config, settings, functools.partial(get_moe_block_spec, spec_config=spec,
                                                     use_transformer_engine=False), wrap_ddp=False)[0]
    tracker_values(1, config.num_layers)  # reads and clears whatever earlier tests left in the tracker
    model.load_state_dict(state)
    model = model.to(device)
    if config.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    model.train()
    out = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                labels=batch["labels"])
    lm = out.float().mean()
    lm.backward()
    values = tracker_values(1, config.num_layers)
    return {n: values[n] for n in OUR_LOSSES}, float(lm.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_model_losses_in_bf16_match_the_fp32_model(device):
    """The tiny GPT in bf16 (megatron's Float16Module, as a bf16 run trains it) logs every loss close to
    the fp32 model with the same weights: bf16 rounding of the activations only."""
    from megatron_moe_spec.core.layer_specs import get_moe_block_spec
    from megatron_moe_spec.testing.tiny_gpt import (
        TinyGPTSettings, build_model, build_transformer_config, global_microbatches)

    extra = {"transformer_impl": "local"}
    if device == "cuda":
        extra["use_cpu_initialization"] = False
    settings = TinyGPTSettings(num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=64,
                               micro_batch_size=4, seq_length=64, extra_config=extra)
    with megatron_world(device):
        config32 = build_transformer_config(settings)
        torch.manual_seed(1234)
        state = build_model(config32, settings, functools.partial(get_moe_block_spec, spec_config=ALL_ON),
                            wrap_ddp=False)[0].state_dict()
        config16 = build_transformer_config(settings.replace(extra_config=dict(
            extra, bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)))
        batch = to_device(global_microbatches(settings, 1)[0], device)
        ref, lm_ref = _model_losses(settings, config32, ALL_ON, state, device, batch)
        low, lm_low = _model_losses(settings, config16, ALL_ON, state, device, batch)
    errors = {}
    for name in OUR_LOSSES:
        a, b = torch.tensor(low[name], dtype=torch.float64), torch.tensor(ref[name], dtype=torch.float64)
        assert bool(torch.isfinite(a).all()) and bool((b != 0).any()), (name, low[name], ref[name])
        # per layer, relative to the loss's own size (the layers' values differ by orders of magnitude)
        err = float(((a - b).abs() / b.abs().clamp(min=1e-3 * float(b.abs().max()))).max())
        errors[name] = err
        assert err <= BF16_MODEL_TOL[name], (name, low[name], ref[name])
    assert abs(lm_low - lm_ref) <= 2e-2 * abs(lm_ref), (lm_low, lm_ref)
    write_report(f"bf16_model_{device}", {"max_rel_error_per_layer": errors, "tolerance": BF16_MODEL_TOL,
                                          "lm_loss": {"bf16": lm_low, "fp32": lm_ref}})


# Largest relative per-layer difference allowed between the bf16 and the fp32 model. Measured on CPU
# (tests/test_gpu.py::test_model_losses_in_bf16_match_the_fp32_model[cpu], megatron-core 0.16.1):
# R_sp 1.4e-2, L_o 6.9e-3, L_v 8.0e-4, R_cp 1.2e-4; the bounds leave room for other GEMM kernels.
# R_sp compares nearly orthogonal rows (squared cosines ~ 1/F), so bf16 noise in z shows most there.
BF16_MODEL_TOL = {"specialization_loss": 6e-2, "orthogonality_loss": 3e-2, "variance_loss": 1e-2,
                  "coupling_loss": 1e-2}


# ============================================================================ the smoke run
def check_smoke_run(run_dir: str, cfg) -> dict:
    """The run directory of a smoke run: every loss and metric logged at every step and finite, the
    LM loss lower at the end, validation and checkpoints where the config puts them."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    steps = cfg.training.train_iters
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    moe = cfg.model.moe_layer_indices
    for r in recs:
        for name in AUX_LOSSES + METRICS:
            assert name in r and r[name] is not None and math.isfinite(r[name]), (r["step"], name)
            layers = moe[:-1] if name in ("coupling_loss", "pathway_nmi") else moe
            for i in layers:
                assert math.isfinite(r[f"{name}/layer_{i}"]), (r["step"], name, i)
        assert r["specialization_loss"] > 0 and r["coupling_loss"] < 0 and r["variance_loss"] < 0
    losses = [r["lm_loss"] for r in recs]
    n = max(1, steps // 8)
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    assert last < first - 0.05, losses
    evals = [r["step"] for r in recs if "val_lm_loss" in r]
    assert evals == [s for s in range(1, steps + 1) if s % cfg.eval.interval == 0 or s == steps]
    ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    saves = [s for s in range(1, steps + 1) if s % cfg.checkpoint.save_interval == 0 or s == steps]
    assert ckpts == [f"iter_{s:07d}" for s in saves] + ["latest"], ckpts
    return {"steps": steps, "lm_loss_first": losses[0], "lm_loss_last": losses[-1],
            "step_time_s_median": sorted(r["step_time_s"] for r in recs)[len(recs) // 2],
            "last": {k: recs[-1][k] for k in AUX_LOSSES + METRICS + ["lm_loss"]}}


def run_smoke(run_dir: str, overrides=(), timeout: int = 420):
    """scripts/pretrain.sh on the GPU smoke config, one process (torchrun), this interpreter."""
    from megatron_moe_spec.training.distributed import free_port

    env = dict(os.environ, MMS_NO_SETUP="1", PYTHON=sys.executable, MASTER_PORT=str(free_port()),
               NPROC_PER_NODE="1")
    sets = [a for o in (f"logging.run_dir={run_dir}", *overrides) for a in ("--set", o)]
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "pretrain.sh"), GPU_SMOKE, *sets],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.gpu
@needs_cuda
def test_smoke_config_one_nccl_rank(tmp_path):
    run_dir = str(tmp_path / "smoke")
    proc = run_smoke(run_dir)
    assert "no CUDA" not in proc.stdout and "bf16 on CUDA (nccl)" in proc.stdout
    cfg = load_run_config([GPU_SMOKE], [f"logging.run_dir={run_dir}"])
    impl, grouped = resolve_backend(cfg, cpu=False)
    summary = check_smoke_run(run_dir, cfg)
    summary.update(transformer_impl=impl, moe_grouped_gemm=grouped, device=torch.cuda.get_device_name(0))
    write_report("smoke", summary)


@pytest.mark.slow
@CPU_ONLY
def test_smoke_config_on_cpu_with_gloo(tmp_path):
    """The same checks on a shortened CPU run of the smoke config (fp32, gloo): the GPU test's logic."""
    run_dir = str(tmp_path / "smoke_cpu")
    overrides = ["training.device=cpu", "training.precision=fp32", "training.train_iters=8",
                 "eval.interval=4", "checkpoint.save_interval=4", "training.lr_warmup_iters=1"]
    proc = run_smoke(run_dir, overrides)
    assert "no CUDA: running on CPU with gloo" in proc.stdout
    assert "layers: local spec, sequential experts, fp32 on CPU (gloo)" in proc.stdout
    check_smoke_run(run_dir, load_run_config([GPU_SMOKE], overrides + [f"logging.run_dir={run_dir}"]))


# ============================================================================ peak memory
def _peak_step_memory(settings, spec, config):
    """Peak bytes allocated above the resting state during one bf16 forward+backward (after a warm-up
    step that allocates the gradients)."""
    from megatron.core.transformer.module import Float16Module

    from megatron_moe_spec.core.layer_specs import get_moe_block_spec
    from megatron_moe_spec.testing.tiny_gpt import build_model, global_microbatches

    torch.manual_seed(1234)
    model = build_model(config, settings, functools.partial(get_moe_block_spec, spec_config=spec,
                                                            use_transformer_engine=False), wrap_ddp=False)[0]
    model = Float16Module(config, model.cuda())
    model.train()
    batch = to_device(global_microbatches(settings, 1)[0], "cuda")

    def step():
        out = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                    labels=batch["labels"])
        out.float().mean().backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resting = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - resting
    del model
    torch.cuda.empty_cache()
    return peak


@pytest.mark.gpu
@needs_cuda
def test_peak_memory_with_and_without_the_losses():
    """torch.cuda.max_memory_allocated of a bf16 training step, stock megatron vs. every loss and the
    metrics on. The losses save z and y (fp32, [T, k, F] and [T, k, H] per MoE layer) and small
    tensors; the extra peak stays within a few times that."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, build_transformer_config

    settings = TinyGPTSettings(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024,
                               num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=512,
                               vocab_size=1024, seq_length=512, micro_batch_size=8,
                               extra_config={"transformer_impl": "local", "use_cpu_initialization": False,
                                             "bf16": True, "params_dtype": torch.bfloat16})
    with megatron_world("cuda"):
        config = build_transformer_config(settings)
        off = _peak_step_memory(settings, SpecializationConfig(), config)
        clear_aux_losses_tracker()
        on = _peak_step_memory(settings, dataclasses.replace(ALL_ON, metrics=True), config)
        clear_aux_losses_tracker()
    T = settings.seq_length * settings.micro_batch_size
    k, F, H = settings.moe_router_topk, settings.moe_ffn_hidden_size, settings.hidden_size
    saved_zy = settings.num_layers * T * k * (F + H) * 4  # fp32 z and y of every MoE layer
    write_report("peak_memory", {"peak_bytes_without_losses": off, "peak_bytes_with_losses": on,
                                 "ratio": on / off, "extra_bytes": on - off, "z_and_y_fp32_bytes": saved_zy,
                                 "tokens_per_micro_batch": T})
    assert on >= 0.99 * off, (on, off)
    assert on - off <= 8 * saved_zy, (on, off, saved_zy)
