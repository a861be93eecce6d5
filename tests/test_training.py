"""The training driver end to end on CPU: scripts/pretrain.sh -> torchrun -> ``train`` on 2 gloo ranks.

- smoke: configs/ci_smoke.yaml (tp 2 + sp, ep 2, alltoall, every loss and the metrics on) for 6 steps,
  checkpoints at 3 and 6; the run directory's files are checked key by key (docs/design.md).
- resume: a second run starts from the first run's iteration-3 checkpoint; steps 4-6 must reproduce the
  uninterrupted run exactly (every logged value but the timings, and the routing matrices).
- crash while saving: the checkpoint writer raises in the middle of a save; the previous checkpoint and
  ``latest`` stay valid, ``checkpoint.resume: auto`` continues from them and each step is logged once.
- configuration errors: exit code 2 and one message naming the key, before torch is even imported.
"""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_SMOKE = os.path.join(ROOT, "configs", "ci_smoke.yaml")
STEPS = 6
MOE_LAYERS = [1, 2, 3]  # moe_layer_freq [0, 1, 1, 1]: 0-based indices of the MoE layers
AUX_LOSSES = ["load_balancing_loss", "z_loss", "specialization_loss", "coupling_loss",
              "orthogonality_loss", "variance_loss"]
METRICS = ["routing_entropy", "topk_mass", "load_cv", "max_vio", "dead_experts", "token_expert_mi",
           "coactivation", "activation_similarity", "pathway_nmi", "domain_mi"]
TIMING = {"tokens_per_sec", "step_time_s"}


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain(run_dir, *overrides, timeout=240):
    """scripts/pretrain.sh on ci_smoke (2 processes: the config's world size) without the venv setup."""
    env = dict(os.environ, MMS_NO_SETUP="1", PYTHON=sys.executable, MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1")
    env.pop("NPROC_PER_NODE", None)
    sets = [a for o in (f"logging.run_dir={run_dir}",) + overrides for a in ("--set", o)]
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "pretrain.sh"), CI_SMOKE, *sets],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    full, resumed = str(base / "full"), str(base / "resumed")
    first = _pretrain(full, "logging.tensorboard=true")
    second = _pretrain(resumed, f"checkpoint.resume={full}/checkpoints/iter_0000003")
    return {"full": full, "resumed": resumed, "first": first, "second": second}


@pytest.mark.multirank
@pytest.mark.timeout(600)
def test_smoke_lm_loss_finite_and_decreasing(runs):
    recs = _records(os.path.join(runs["full"], "metrics.jsonl"))
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))  # log_interval 1
    losses = [r["lm_loss"] for r in recs]
    assert all(math.isfinite(x) for x in losses), losses
    assert 4.0 < losses[0] < 6.5, losses  # ~ln(256) at initialization
    assert losses[-1] < losses[0] - 0.05, losses
    assert [r["step"] for r in recs if "val_lm_loss" in r] == [3, 6]  # eval.interval 3
    val = [r["val_lm_loss"] for r in recs if "val_lm_loss" in r]
    assert all(math.isfinite(v) for v in val) and val[1] < val[0], val
    assert recs[0]["lr"] == 0.0 and recs[1]["lr"] == pytest.approx(1e-3)  # warm-up 1, then cosine
    assert all(r["lr"] < 1e-3 for r in recs[2:])
    assert all(r["tokens_per_sec"] > 0 and r["step_time_s"] > 0 for r in recs)
    out = runs["first"].stdout
    assert out.count("no CUDA: running on CPU with gloo") == 1, out
    assert "world size 2 (tp 2, pp 1, cp 1, dp 1, ep 2, etp 1)" in out


@pytest.mark.multirank
@pytest.mark.timeout(600)
def test_smoke_every_loss_and_metric_mean_and_per_layer(runs):
    for r in _records(os.path.join(runs["full"], "metrics.jsonl")):
        for name in AUX_LOSSES + METRICS:
            assert name in r and r[name] is not None and math.isfinite(r[name]), (r["step"], name)
            # coupling_loss belongs to the first layer of each MoE pair; pathway_nmi likewise
            layers = MOE_LAYERS[:-1] if name in ("coupling_loss", "pathway_nmi") else MOE_LAYERS
            per_layer = [r[f"{name}/layer_{i}"] for i in layers]
            assert r[name] == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-9, abs=1e-12), name
            assert f"{name}/layer_0" not in r  # the dense first layer
            assert f"{name}/layer_{MOE_LAYERS[-1]}" not in r or name not in ("coupling_loss", "pathway_nmi")
        assert r["load_balancing_loss"] == pytest.approx(1.0, abs=0.1)  # E * sum f_i p_i, ~1 when balanced
        assert r["z_loss"] > 0 and r["specialization_loss"] > 0 and r["coupling_loss"] < 0
        assert r["variance_loss"] < 0  # -variance
        assert 0 < r["routing_entropy"] <= 1 and 0 <= r["activation_similarity"] <= 1


@pytest.mark.multirank
@pytest.mark.timeout(600)
def test_smoke_routing_jsonl(runs):
    recs = _records(os.path.join(runs["full"], "routing.jsonl"))
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    tokens_per_step = 4 * 32  # global batch x sequence length
    for r in recs:
        assert sorted(r["layers"]) == [str(i) for i in MOE_LAYERS]
        for i in MOE_LAYERS:
            layer = r["layers"][str(i)]
            tpe = layer["tokens_per_expert"]
            assert len(tpe) == 8 and sum(tpe) == pytest.approx(2 * tokens_per_step)  # top-2
            assert len(layer["similarity"]) == 8 and all(len(row) == 8 for row in layer["similarity"])
            assert len(layer["expert_domain"]) == 8 and all(len(row) == 3 for row in layer["expert_domain"])
            assert sum(map(sum, layer["expert_domain"])) == pytest.approx(tokens_per_step)  # top-1 counts
            if i != MOE_LAYERS[-1]:
                assert sum(map(sum, layer["transition"])) == pytest.approx(tokens_per_step)
            else:
                assert "transition" not in layer


@pytest.mark.multirank
@pytest.mark.timeout(600)
def test_smoke_checkpoints_and_tensorboard(runs):
    ckpts = os.path.join(runs["full"], "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["iter_0000003", "iter_0000006", "latest"]
    with open(os.path.join(ckpts, "latest")) as f:
        assert f.read().strip() == "6"
    assert os.path.isfile(os.path.join(ckpts, "iter_0000003", "metadata.json"))
    with open(os.path.join(runs["full"], "config.yaml")) as f:
        assert "run_dir: " + runs["full"] in f.read()
    with open(os.path.join(runs["full"], "domains.json")) as f:  # the data's domain names, for the report
        assert json.load(f) == {"domains": ["mock_0", "mock_1", "mock_2"]}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(runs["full"], "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["lm loss", "lm loss validation", "learning-rate", "moe/load_balancing_loss",
                "moe/specialization_loss_layer_1", "moe/coupling_loss_layer_2",
                "routing/routing_entropy", "routing/activation_similarity_layer_3"]:
        assert tag in tags, sorted(tags)
    assert [e.step for e in acc.Scalars("lm loss")] == list(range(1, STEPS + 1))


@pytest.mark.multirank
@pytest.mark.timeout(600)
def test_resume_reproduces_the_uninterrupted_run_exactly(runs):
    full = {r["step"]: r for r in _records(os.path.join(runs["full"], "metrics.jsonl"))}
    resumed = _records(os.path.join(runs["resumed"], "metrics.jsonl"))
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert "resumed from" in runs["second"].stdout and "iteration 3, 12 samples consumed" in runs["second"].stdout
    for r in resumed:
        expected = full[r["step"]]
        assert set(r) == set(expected)
        for key in set(r) - TIMING:
            assert r[key] == expected[key], (r["step"], key, r[key], expected[key])  # bit-identical
    full_routing = {r["step"]: r for r in _records(os.path.join(runs["full"], "routing.jsonl"))}
    for r in _records(os.path.join(runs["resumed"], "routing.jsonl")):
        assert r == full_routing[r["step"]]


# ----------------------------------------------------------------------------- crash while saving
def _crash_while_saving(run_dir):
    """Runs in a spawned gloo rank (world size 1): train 4 steps saving every 2, the second save
    crashes inside megatron's writer; then a new run with resume: auto."""
    from megatron.core import dist_checkpointing

    from megatron_moe_spec.run_config import load_run_config
    from megatron_moe_spec.training import checkpointing
    from megatron_moe_spec.training.loop import train

    overrides = [f"logging.run_dir={run_dir}", "parallel.tp=1", "parallel.sp=false", "parallel.ep=1",
                 "training.train_iters=4", "checkpoint.save_interval=2", "checkpoint.resume=auto",
                 "eval.interval=0", "specialization.metrics=false", "training.global_batch_size=2",
                 "training.micro_batch_size=2"]
    cfg = load_run_config([CI_SMOKE], overrides)
    real_save = dist_checkpointing.save
    calls = []

    def failing_save(state, directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 2:
            with open(os.path.join(directory, "__0_0.distcp"), "wb") as f:
                f.write(b"half a checkpoint")
            raise OSError("simulated crash while writing the checkpoint")
        return real_save(state, directory, *args, **kwargs)

    dist_checkpointing.save = failing_save
    try:
        train(cfg)
        raise AssertionError("the save did not crash")
    except OSError as e:
        assert "simulated crash" in str(e)
    finally:
        dist_checkpointing.save = real_save
    root = checkpointing.checkpoints_root(run_dir)
    after_crash = {"listing": sorted(os.listdir(root)), "latest": checkpointing.read_latest(root),
                   "valid": dist_checkpointing.check_is_distributed_checkpoint(
                       checkpointing.iteration_dir(root, 2)),
                   "steps": [r["step"] for r in _records(os.path.join(run_dir, "metrics.jsonl"))]}
    from megatron_moe_spec.training.distributed import teardown

    teardown()  # as the train command does; the next run initializes again
    last = train(load_run_config([CI_SMOKE], overrides))  # resume: auto
    after_resume = {"listing": sorted(os.listdir(root)), "latest": checkpointing.read_latest(root),
                    "steps": [r["step"] for r in _records(os.path.join(run_dir, "metrics.jsonl"))],
                    "last_step": last["step"]}
    # The same run from scratch logging every 2 steps: each record averages its 2 steps.
    teardown()
    interval_dir = run_dir + "_interval2"
    train(load_run_config([CI_SMOKE], overrides + [f"logging.run_dir={interval_dir}",
                                                   "logging.log_interval=2", "checkpoint.save_interval=0",
                                                   "checkpoint.save_final=false"]))
    after_resume["per_step"] = _records(os.path.join(run_dir, "metrics.jsonl"))
    after_resume["every_2"] = _records(os.path.join(interval_dir, "metrics.jsonl"))
    return after_crash, after_resume


@pytest.mark.timeout(600)
def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path):
    # A plain child process (megatron's checkpoint writer starts processes of its own, which
    # multiprocessing forbids inside run_distributed's daemonic ranks); one rank, no torchrun.
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), run_dir], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    after_crash, after_resume = json.loads(proc.stdout.strip().splitlines()[-1])
    # The crash: iteration 2 complete and pointed to, iteration 4 only as an unfinished .tmp.
    assert after_crash["listing"] == ["iter_0000002", "iter_0000004.tmp", "latest"]
    assert after_crash["latest"] == 2 and after_crash["valid"]
    assert after_crash["steps"] == [1, 2, 3, 4]
    # resume: auto continues from iteration 2; the steps after it are logged once.
    assert after_resume["latest"] == 4 and after_resume["last_step"] == 4
    assert after_resume["listing"] == ["iter_0000002", "iter_0000004", "latest"]
    assert after_resume["steps"] == [1, 2, 3, 4]
    # log_interval 2: a record averages the steps since the previous one (loss and aux losses).
    per_step, every_2 = after_resume["per_step"], after_resume["every_2"]
    assert [r["step"] for r in every_2] == [2, 4]
    for rec, pair in zip(every_2, (per_step[0:2], per_step[2:4])):
        for key in ["lm_loss", "load_balancing_loss", "specialization_loss", "coupling_loss/layer_1"]:
            assert rec[key] == pytest.approx((pair[0][key] + pair[1][key]) / 2, rel=1e-6), key
        assert rec["lr"] == pair[1]["lr"]


# ----------------------------------------------------------------------------- configuration errors
def _train_cli(tmp_path, args, env_extra=None):
    """``train`` in a fresh interpreter; reports whether torch / megatron were ever imported."""
    code = ("import sys, json\n"
            "from megatron_moe_spec.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith('megatron.core'))\n"
            "print(json.dumps({'rc': rc, 'heavy': heavy}))\n")
    env = dict(os.environ, PYTHONPATH=ROOT, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-c", code, "train", *args], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=60)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["rc"], result["heavy"], proc.stderr


@pytest.mark.parametrize("case", ["wrong key", "impossible combination", "world size", "missing data path",
                                  "half precision on CPU", "wandb not installed"])
def test_config_errors_exit_2_naming_the_key_before_anything_is_built(tmp_path, case):
    env = {"WORLD_SIZE": "2"}  # what torchrun sets for ci_smoke
    if case == "wandb not installed":
        import importlib.util

        if importlib.util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed here: the missing-package error cannot occur")
        args = [CI_SMOKE, "--set", "logging.wandb_project=demo"]
        key, fragments = "logging.wandb_project", ["pip install wandb", "logging.wandb_project: null"]
    elif case == "half precision on CPU":
        args = [CI_SMOKE, "--set", "training.precision=bf16"]
        key, fragments = "training.precision", ["does not run on CPU", "fp32"]
    elif case == "wrong key":
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"include: {CI_SMOKE}\nmodel:\n  num_expert: 4\n")
        args, key, fragments = [str(bad)], "model.num_expert", ["bad.yaml", "did you mean model.num_moe_experts"]
    elif case == "impossible combination":
        args = [CI_SMOKE, "--set", "parallel.sp=false"]
        key, fragments = "parallel.sp", ["needs sequence parallel", "set parallel.sp: true"]
    elif case == "world size":
        args, env = [CI_SMOKE], {"WORLD_SIZE": "3"}
        key, fragments = "parallel", ["world size 3 is not divisible by tp*pp*cp"]
    else:
        args = [CI_SMOKE, "--set", "data.type=indexed", "--set", "data.paths=[missing/corpus]",
                "--set", f"data.tokenizer_path={tmp_path}"]
        key, fragments = "data.paths[0]", ["missing data path", "missing/corpus.bin"]
    rc, heavy, stderr = _train_cli(tmp_path, args, env)
    assert rc == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], stderr
    for frag in fragments:
        assert frag in stderr, (frag, stderr)
    assert heavy == [], heavy  # rejected before torch / megatron-core were imported: nothing was built
    assert not (tmp_path / "runs").exists()


if __name__ == "__main__":  # the child process of test_crash_while_saving_keeps_the_previous_checkpoint
    result = _crash_while_saving(sys.argv[1])
    from megatron_moe_spec.training.distributed import teardown

    teardown()
    print(json.dumps(result))
