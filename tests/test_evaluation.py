"""Evaluation per domain: ``val_lm_loss`` is the mean over domains of each domain's mean loss, logged with
``val_lm_loss/<domain>``; the final evaluation also reports the test split (``test_lm_loss``,
``test_lm_loss/<domain>``). The arithmetic by hand, then one short single-process run on mock data."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_moe_spec.training.loop import domain_key, domain_mean_losses
from megatron_moe_spec.training.reporting import tensorboard_tag
from megatron_moe_spec.training.step import domain_sums, loss_func

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_domain_sums_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    domain = torch.tensor([0, 2, 2, 2, -1, 0])  # token 2 masked, token 4 of unknown domain
    out = domain_sums(losses, mask, domain, 3)
    assert out.tolist() == [[7.0, 2.0], [0.0, 0.0], [6.0, 2.0]]
    # loss_func reports them next to the token totals, from [b, s] tensors
    _, report = loss_func(mask.view(2, 3), False, losses.view(2, 3), domain=domain.view(2, 3), num_domains=3)
    assert report["lm loss"].tolist() == [18.0, 5.0]
    assert report["lm loss domains"].tolist() == [[7.0, 2.0], [0.0, 0.0], [6.0, 2.0]]
    _, plain = loss_func(mask.view(2, 3), False, losses.view(2, 3))
    assert set(plain) == {"lm loss"}  # training: no per-domain report


def test_domain_mean_losses_by_hand():
    totals = torch.tensor([18.0, 5.0], dtype=torch.float64)
    per = torch.tensor([[7.0, 2.0], [0.0, 0.0], [6.0, 2.0]], dtype=torch.float64)
    out = domain_mean_losses(totals, per, ["prose", "code", "technical"], "val_lm_loss")
    # code has no token: left out of the mean; the mean weighs domains, not tokens (18 / 5 = 3.6)
    assert out == {"val_lm_loss/prose": 3.5, "val_lm_loss/technical": 3.0, "val_lm_loss": 3.25}
    assert domain_mean_losses(totals, None, None, "test_lm_loss") == {"test_lm_loss": 3.6}
    assert domain_mean_losses(totals, per * 0, None, "x") == {"x": 3.6}  # no token with a domain
    assert domain_mean_losses(totals, per, None, "v")["v/0"] == 3.5  # no names: the ids
    assert domain_key("val_lm_loss", "/data/a b/corpus") == "val_lm_loss/data_a_b_corpus"
    assert tensorboard_tag("val_lm_loss/prose") == "lm loss validation/prose"
    assert tensorboard_tag("test_lm_loss") == "lm loss test"


@pytest.mark.timeout(300)
def test_run_logs_per_domain_validation_and_final_test(tmp_path):
    run_dir = str(tmp_path / "run")
    sets = ["training.train_iters=4", "eval.interval=2", "eval.iters=2", f"logging.run_dir={run_dir}",
            "logging.tensorboard=false", "checkpoint.save_interval=0", "checkpoint.save_final=false",
            "checkpoint.resume=none", "training.lr_warmup_iters=1", "logging.log_interval=1",
            "logging.progress_bar=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)  # a single process started without torchrun
    proc = subprocess.run([sys.executable, "-m", "megatron_moe_spec", "train", os.path.join(ROOT, "configs", "tiny_vanilla.yaml"),
                           *[a for s in sets for a in ("--set", s)]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = {r["step"]: r for r in map(json.loads, f)}
    domains = [f"mock_{d}" for d in range(3)]
    for step in (2, 4):
        r = recs[step]
        per = [r[f"val_lm_loss/{d}"] for d in domains]
        assert all(math.isfinite(x) for x in per) and len(set(per)) == 3
        assert r["val_lm_loss"] == pytest.approx(sum(per) / 3, rel=1e-12)
    assert not any(k.startswith("val_lm_loss") for k in recs[1]) and not any(k.startswith("val_") for k in recs[3])
    # the test split: once, at the final evaluation, per domain too; not the validation numbers
    assert [s for s, r in recs.items() if "test_lm_loss" in r] == [4]
    test = [recs[4][f"test_lm_loss/{d}"] for d in domains]
    assert recs[4]["test_lm_loss"] == pytest.approx(sum(test) / 3, rel=1e-12)
    assert test != [recs[4][f"val_lm_loss/{d}"] for d in domains]
    assert "| test " in proc.stdout
