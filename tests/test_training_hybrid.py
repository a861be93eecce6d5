"""The training driver on a HybridModel (``model.hybrid_layer_pattern``, megatron-core >= 0.19), on CPU:
scripts/pretrain.sh -> torchrun -> ``train``.

- one process: configs/tiny_deepseek_hybrid.yaml (``*-*E*E*E``: a dense pair, then three MoE pairs) for 4
  steps with every loss and the metrics on, checkpoints at 2 and 4. R_sp, L_o, L_v and the metrics are
  logged for the E layers (pattern positions 3, 5, 7) only, R_cp and pathway_nmi for the pairs (3, 5) and
  (5, 7) (the first across the attention layer between), each mean the mean of its layers;
- resume: a second run from the iteration-2 checkpoint reproduces steps 3-4 exactly (HybridModel's
  sharded state dict through our checkpointing);
- EP2: two processes, expert parallel 2 with the alltoall dispatcher, 2 steps;
- PP2: two processes, ``*E*E|*E*E`` (one segment per pipeline rank), R_cp logged for the pair across
  the | under cp_pipeline: exact, left out under skip.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from megatron_moe_spec.run_config import hybrid_model_available, installed_megatron_core_version

pytestmark = pytest.mark.skipif(
    not hybrid_model_available(),
    reason=f"HybridModel needs megatron-core >= 0.19; this environment has {installed_megatron_core_version()} "
           f"(tests/test_run_config_hybrid.py checks the refusal)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_deepseek_hybrid.yaml")
PATTERN = "*-*E*E*E"
MOE_LAYERS = [3, 5, 7]  # 0-based positions of the E in the pattern
PAIR_LAYERS = [3, 5]    # R_cp / pathway_nmi: the earlier layer of each pair of consecutive E
LOSSES = ["load_balancing_loss", "specialization_loss", "coupling_loss", "orthogonality_loss", "variance_loss"]
METRICS = ["routing_entropy", "topk_mass", "load_cv", "max_vio", "dead_experts", "token_expert_mi",
           "coactivation", "activation_similarity", "pathway_nmi", "domain_mi"]
TIMING = {"tokens_per_sec", "step_time_s"}
COMMON = ["training.lr_warmup_iters=1", "logging.log_interval=1", "specialization.metrics_interval=1",
          "specialization.ortho_coeff=1e-3", "specialization.var_coeff=1e-3", "model.seq_length=32",
          "eval.interval=2", "eval.iters=1", "logging.tensorboard=false", "logging.progress_bar=false"]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain(run_dir, nproc, *overrides, timeout=400):
    env = dict(os.environ, MMS_NO_SETUP="1", PYTHON=sys.executable, MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", NPROC_PER_NODE=str(nproc))
    sets = [a for o in (f"logging.run_dir={run_dir}", *COMMON, *overrides) for a in ("--set", o)]
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "pretrain.sh"), CONFIG, *sets],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _records(run_dir, name="metrics.jsonl"):
    with open(os.path.join(run_dir, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hybrid")
    full, resumed = str(base / "full"), str(base / "resumed")
    first = _pretrain(full, 1, "training.train_iters=4", "checkpoint.save_interval=2", "checkpoint.resume=none")
    second = _pretrain(resumed, 1, "training.train_iters=4", "checkpoint.save_interval=2",
                       f"checkpoint.resume={full}/checkpoints/iter_0000002")
    return {"full": full, "resumed": resumed, "first": first, "second": second}


@pytest.mark.timeout(900)
def test_hybrid_model_trains_with_every_loss_and_metric_on_the_E_layers(runs):
    out = runs["first"].stdout
    assert f"HybridModel '{PATTERN}'" in out, out
    recs = _records(runs["full"])
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    losses = [r["lm_loss"] for r in recs]
    assert all(math.isfinite(x) for x in losses) and 5.0 < losses[0] < 7.5, losses  # ~ln(512) at init
    for r in recs:
        for name in LOSSES + METRICS:
            layers = PAIR_LAYERS if name in ("coupling_loss", "pathway_nmi") else MOE_LAYERS
            per_layer = [r[f"{name}/layer_{i}"] for i in layers]
            assert all(v is not None and math.isfinite(v) for v in per_layer), (r["step"], name)
            assert r[name] == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-9, abs=1e-12), name
            others = {k for k in r if k.startswith(name + "/layer_")} - {f"{name}/layer_{i}" for i in layers}
            assert not others, (name, others)  # nothing on the attention / dense layers, no last-E pair
        assert r["specialization_loss"] > 0 and r["coupling_loss"] < 0 and r["variance_loss"] < 0
        assert r["orthogonality_loss"] > 0
    routing = _records(runs["full"], "routing.jsonl")
    for r in routing:
        assert sorted(r["layers"], key=int) == [str(i) for i in MOE_LAYERS]
        for i in MOE_LAYERS:
            tokens = r["layers"][str(i)]["tokens_per_expert"]
            assert len(tokens) == 16 and sum(tokens) == pytest.approx(4 * 8 * 32)  # top-4 of 16, 8 x 32 tokens
            assert ("transition" in r["layers"][str(i)]) == (i in PAIR_LAYERS)
    assert os.path.isdir(os.path.join(runs["full"], "checkpoints", "iter_0000004"))


@pytest.mark.timeout(900)
def test_hybrid_model_resumes_exactly(runs):
    full = {r["step"]: r for r in _records(runs["full"])}
    resumed = _records(runs["resumed"])
    assert [r["step"] for r in resumed] == [3, 4]
    for r in resumed:
        expected = {k: v for k, v in full[r["step"]].items() if k not in TIMING}
        assert {k: v for k, v in r.items() if k not in TIMING} == expected, r["step"]
    assert "resumed from" in runs["second"].stdout


@pytest.mark.multirank
@pytest.mark.timeout(900)
def test_hybrid_model_with_expert_parallel_2(tmp_path):
    run_dir = str(tmp_path / "ep2")
    proc = _pretrain(run_dir, 2, "training.train_iters=2", "parallel.ep=2",
                     "model.moe_token_dispatcher_type=alltoall", "checkpoint.save_final=false",
                     "checkpoint.resume=none")
    assert "world size 2 (tp 1, pp 1, cp 1, dp 2, ep 2, etp 1)" in proc.stdout
    for r in _records(run_dir):
        for name in LOSSES:
            layers = PAIR_LAYERS if name == "coupling_loss" else MOE_LAYERS
            assert all(math.isfinite(r[f"{name}/layer_{i}"]) for i in layers), name
        assert r["specialization_loss"] > 0 and r["coupling_loss"] < 0


PP_PATTERN = "*E*E|*E*E"    # segment 0 (pipeline rank 0): E at 1, 3; segment 1 (rank 1): E at 5, 7
PP_PAIRS = {"exact": [1, 3, 5], "skip": [1, 5]}  # (3, 5) crosses the | (the side channel carries it)


@pytest.mark.multirank
@pytest.mark.timeout(900)
def test_hybrid_model_with_pipeline_parallel_2_logs_R_cp_across_the_segments(tmp_path):
    """PP2 on a pattern with one |: the run config accepts it, the driver trains, and R_cp is logged for
    each pair of consecutive E, the pair across the | included under cp_pipeline: exact (and left out
    under skip, whose other pairs read the same step-1 values: the forward before any update)."""
    recs = {}
    for policy, steps in (("exact", 3), ("skip", 2)):
        run_dir = str(tmp_path / policy)
        proc = _pretrain(run_dir, 2, f"training.train_iters={steps}", "parallel.pp=2",
                         f'model.hybrid_layer_pattern="{PP_PATTERN}"', f"specialization.cp_pipeline={policy}",
                         "specialization.metrics=false", "eval.interval=0", "checkpoint.save_final=false",
                         "checkpoint.resume=none")
        assert f"HybridModel '{PP_PATTERN}'; world size 2 (tp 1, pp 2, cp 1, dp 1" in proc.stdout, proc.stdout
        recs[policy] = _records(run_dir)
        assert [r["step"] for r in recs[policy]] == list(range(1, steps + 1))
        for r in recs[policy]:
            assert math.isfinite(r["lm_loss"])
            for name in LOSSES:
                layers = PP_PAIRS[policy] if name == "coupling_loss" else [1, 3, 5, 7]
                per_layer = [r[f"{name}/layer_{i}"] for i in layers]
                assert all(math.isfinite(v) for v in per_layer), (policy, r["step"], name)
                assert r[name] == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-9, abs=1e-12), name
                others = {k for k in r if k.startswith(name + "/layer_")} - {f"{name}/layer_{i}" for i in layers}
                assert not others, (policy, name, others)
            assert r["coupling_loss"] < 0 and r["specialization_loss"] > 0
    exact, skip = recs["exact"][0], recs["skip"][0]
    for i in PP_PAIRS["skip"]:
        assert skip[f"coupling_loss/layer_{i}"] == exact[f"coupling_loss/layer_{i}"], i
    assert skip["lm_loss"] == exact["lm_loss"]
