"""scripts/bench_quality.py: the aggregation on synthetic run dirs (checked by hand), the markdown table,
and the grid runner's command construction and skip logic (no training: one real run takes ~15 s of
imports and steps per variant on a free core, too slow for CI; the end-to-end --quick run is `slow`)."""
import json
import math
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest
from conftest import load_script

from megatron_moe_spec.report.synthetic import write_synthetic_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_script():
    return load_script("bench_quality")


bq = _load_script()


def _write_metrics(path, records, ep=1):
    """A run directory as a run leaves it: its metrics and its config (``ep``: the processes it ran on)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write(f"parallel:\n  tp: 1\n  ep: {ep}\n")


def _std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ----------------------------------------------------------------------------- aggregation
def test_aggregate_synthetic_runs_by_hand(tmp_path):
    """Three synthetic seeds of one cell: mean and sample std of exp(last val_lm_loss) and of every
    metric's mean over the last 10% of the steps, recomputed here from metrics.jsonl."""
    dirs = [str(write_synthetic_run(str(tmp_path / f"s{seed}"), seed=seed, train_steps=100, log_interval=5))
            for seed in range(3)]
    rows = bq.aggregate({("tiny_vanilla", "lb_sp_cp"): dirs})
    assert len(rows) == 1
    row = rows[0]
    assert (row["arch"], row["variant"], row["seeds"]) == ("tiny_vanilla", "lb_sp_cp", 3)
    last = []
    for d in dirs:
        with open(os.path.join(d, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f]
        tail = [r for r in recs if r["step"] > 90]  # the last 10% of 100 steps
        assert len(tail) > 1
        last.append({"val_ppl": math.exp([r for r in recs if "val_lm_loss" in r][-1]["val_lm_loss"]),
                     **{k: sum(r[k] for r in tail) / len(tail) for k in bq.METRICS}})
    for key in ("val_ppl",) + bq.METRICS:
        xs = [entry[key] for entry in last]
        assert row[key]["n"] == 3, key
        assert row[key]["mean"] == pytest.approx(sum(xs) / 3, rel=1e-12), key
        assert row[key]["std"] == pytest.approx(_std(xs), rel=1e-9), key
    assert len({entry["val_ppl"] for entry in last}) == 3  # the seeds differ: the std is not trivially 0


def test_aggregate_hand_numbers_missing_and_null_values(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    _write_metrics(a, [{"step": 5, "val_lm_loss": 9.0, "load_cv": 0.9},
                       {"step": 10, "val_lm_loss": math.log(10.0), "load_cv": 0.5, "domain_mi": None}])
    # a resumed run re-logs step 10 (later values win); a null load_cv falls back to the last finite one
    _write_metrics(b, [{"step": 5, "load_cv": 0.3}, {"step": 10, "val_lm_loss": 1.0, "load_cv": 0.7},
                       {"step": 10, "val_lm_loss": math.log(20.0), "load_cv": None}])
    _write_metrics(c, [{"step": 10, "lm_loss": 3.0}])  # no validation, no metrics
    rows = bq.aggregate({("A", "lb"): [a, b], ("A", "lb_sp"): [c], ("B", "lb"): [a]})
    assert [(r["arch"], r["variant"], r["seeds"]) for r in rows] == [("A", "lb", 2), ("A", "lb_sp", 1), ("B", "lb", 1)]
    ppl, cv = rows[0]["val_ppl"], rows[0]["load_cv"]
    assert ppl["mean"] == pytest.approx(15.0) and ppl["std"] == pytest.approx(math.sqrt(50.0)) and ppl["n"] == 2
    assert cv["mean"] == pytest.approx(0.4) and cv["std"] == pytest.approx(math.sqrt(0.02))
    assert rows[0]["domain_mi"] == {"mean": None, "std": None, "n": 0}
    assert rows[1]["val_ppl"] == {"mean": None, "std": None, "n": 0}
    assert rows[2]["val_ppl"]["mean"] == pytest.approx(10.0) and rows[2]["val_ppl"]["std"] is None

    text = bq.markdown_table(rows, "T")
    lines = text.splitlines()
    assert lines[0] == "## T"
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["arch", "variant", "seeds", "val ppl", "Δ val ppl vs lb [95% CI] (won)", "routing entropy",
                      "top-k mass", "load CV", "MaxVio", "act. similarity", "pathway NMI", "domain MI", "tokens/s"]
    cells = [c.strip() for c in lines[4].strip("|").split("|")]
    assert cells[:6] == ["A", "lb", "2", f"15.00 ± {math.sqrt(50):.2f}", "–", "–"]
    assert cells[header.index("load CV")] == f"0.400 ± {math.sqrt(0.02):.3f}"
    assert cells[header.index("domain MI")] == "–"
    assert [c.strip() for c in lines[5].strip("|").split("|")][3] == "–"
    assert [c.strip() for c in lines[6].strip("|").split("|")][3] == "10.00"  # one seed: no ±


def test_tail_mean_and_paired_delta_by_hand(tmp_path):
    recs = [{"step": 80, "load_cv": 9.0}, {"step": 91, "load_cv": 0.2}, {"step": 95, "load_cv": None},
            {"step": 100, "load_cv": 0.4}]
    assert bq.tail_mean(recs, "load_cv") == pytest.approx(0.3)  # steps 91 and 100; 80 is outside, null skipped
    assert bq.tail_mean(recs, "load_cv", fraction=0.25) == pytest.approx((9.0 + 0.2 + 0.4) / 3)
    assert bq.tail_mean(recs[:1] + [{"step": 100}], "load_cv") == 9.0  # nothing in the window: last finite
    assert bq.tail_mean([], "load_cv") is None

    # lb seeds 1, 2, 3 (ppl 10, 20, 40); lb_sp seeds 1, 2, 4 (ppl 9, 22, 5): pairs on seeds 1 and 2 only
    def run(variant, seed, ppl):
        d = str(tmp_path / variant / f"seed_{seed}")
        _write_metrics(d, [{"step": 10, "val_lm_loss": math.log(ppl)}])
        return d
    groups = {("A", "lb"): [run("lb", 1, 10.0), run("lb", 2, 20.0), run("lb", 3, 40.0)],
              ("A", "lb_sp"): [run("lb_sp", 1, 9.0), run("lb_sp", 2, 22.0), run("lb_sp", 4, 5.0)],
              ("B", "lb_sp"): [run("lb_sp", 1, 9.0)]}  # B has no lb: no comparison
    rows = bq.aggregate(groups)
    assert rows[0][bq.DELTA] is None and rows[0]["wins"] is None
    deltas = [-10.0, 10.0]
    assert rows[1][bq.DELTA]["mean"] == pytest.approx(0.0, abs=1e-9) and rows[1][bq.DELTA]["n"] == 2
    assert rows[1][bq.DELTA]["std"] == pytest.approx(_std(deltas)) and rows[1]["wins"] == (1, 2)
    assert rows[2][bq.DELTA] is None
    lines = bq.markdown_table(rows).splitlines()
    half = 12.7062047 * _std(deltas) / math.sqrt(2)  # t_{0.975, 1} * s / sqrt(n)
    assert rows[1][bq.DELTA]["ci_high"] == pytest.approx(half) and not rows[1][bq.DELTA]["shown"]
    assert [c.strip() for c in lines[3].strip("|").split("|")][4] == f"+0.00% [-{half:.2f}, +{half:.2f}] (1/2)"
    assert [c.strip() for c in lines[4].strip("|").split("|")][4] == "–"

    # the plot's per-seed values: the paired differences, none for the baseline and without a baseline
    assert bq.seed_differences(rows, rows[1], bq.PPL) == pytest.approx(deltas)
    assert bq.seed_differences(rows, rows[0], bq.PPL) == [] and bq.seed_differences(rows, rows[2], bq.PPL) == []
    png = str(tmp_path / "t.png")
    bq.plot_quality(rows, png)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_paired_metric_differences_by_hand(tmp_path):
    """The second table: per seed variant - lb of each routing metric, mean ± std, * when all agree."""
    def run(variant, seed, entropy, nmi):
        d = str(tmp_path / variant / f"seed_{seed}")
        _write_metrics(d, [{"step": 10, "val_lm_loss": 1.0, "routing_entropy": entropy, "pathway_nmi": nmi}])
        return d
    groups = {("A", "lb"): [run("lb", 1, 0.90, 0.10), run("lb", 2, 0.80, 0.30)],
              ("A", "lb_cp"): [run("lb_cp", 1, 0.85, 0.20), run("lb_cp", 2, 0.70, 0.20)]}
    rows = bq.aggregate(groups)
    assert rows[0]["paired"] is None
    ent, nmi = rows[1]["paired"]["routing_entropy"], rows[1]["paired"]["pathway_nmi"]
    assert ent["mean"] == pytest.approx(-0.075) and ent["std"] == pytest.approx(_std([-0.05, -0.10]))
    assert ent["agree"] and ent["n"] == 2 and (ent["below"], ent["above"]) == (2, 0)
    t1 = 12.7062047  # t_{0.975, 1}
    sem = _std([-0.05, -0.10]) / math.sqrt(2)  # 0.025
    assert (ent["ci_low"], ent["ci_high"]) == (pytest.approx(-0.075 - t1 * sem), pytest.approx(-0.075 + t1 * sem))
    assert not ent["shown"]  # two seeds of one sign, but the interval contains 0
    assert nmi["mean"] == pytest.approx(0.0, abs=1e-12) and not nmi["agree"]  # +0.1 and -0.1
    assert rows[1]["paired"]["load_cv"]["n"] == 0 and rows[1]["paired"]["load_cv"]["mean"] is None
    assert not bq.paired_differences([0.5])["agree"]  # one seed cannot agree with anything
    text = bq.markdown_table(rows)
    table = text[text.index("### Routing metrics against lb"):].splitlines()
    header = [c.strip() for c in table[2].strip("|").split("|")]
    cells = [c.strip() for c in table[4].strip("|").split("|")]
    assert cells[:3] == ["A", "lb_cp", "2"]
    lo, hi = ent["ci_low"], ent["ci_high"]
    assert cells[header.index("routing entropy")] == f"-0.0750 [{lo:+.4f}, {hi:+.4f}]"
    h = t1 * _std([0.1, -0.1]) / math.sqrt(2)
    assert cells[header.index("pathway NMI")] == f"+0.0000 [{-h:+.4f}, {h:+.4f}]"
    assert cells[header.index("load CV")] == "–"


def test_write_table_markdown_and_json(tmp_path):
    d = str(write_synthetic_run(str(tmp_path / "r"), train_steps=50))
    rows = bq.aggregate({("tiny_deepseek", "lb"): [d]})
    path = str(tmp_path / "out" / "table.md")
    text = bq.write_table(rows, path, "Smoke", {"iters": 50})
    assert open(path).read() == text and "| tiny_deepseek | lb | 1 |" in text
    data = json.load(open(str(tmp_path / "out" / "table.json")))
    assert data["meta"] == {"iters": 50} and data["rows"][0]["val_ppl"]["n"] == 1


# ----------------------------------------------------------------------------- the grid runner
def test_train_command_single_process_and_torchrun():
    cmd = bq.train_command("tiny_deepseek", "lb_sp", 1235, 300, 1, "/d", "/o/r", python="PY")
    assert cmd[:4] == ["PY", "-m", "megatron_moe_spec", "train"]
    assert cmd[4:6] == [str(ROOT / "configs" / "tiny_deepseek.yaml"), str(ROOT / "configs" / "variants" / "lb_sp.yaml")]
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    for s in ["data.type=indexed", "data.paths=[/d/indexed/corpus]", "data.tokenizer_path=/d/tokenizer",
              "training.seed=1235", "training.train_iters=300", "checkpoint.resume=none",
              "checkpoint.save_interval=0", "logging.run_dir=/o/r"]:
        assert s in sets
    assert not any(s.startswith(("parallel.ep", "training.lr_warmup_iters")) for s in sets)
    assert {f"eval.interval={bq.EVAL_INTERVAL}", f"eval.iters={bq.EVAL_ITERS}"} <= set(sets)

    cmd = bq.train_command("tiny_vanilla", "lb", 1234, 10, 2, "/d", "/o/r", python="PY", master_port=555)
    assert cmd[:3] == ["PY", "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[cmd.index("--master_port") + 1] == "555"
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert {"parallel.ep=2", "model.moe_token_dispatcher_type=alltoall", "training.lr_warmup_iters=2",
            "eval.interval=10"} <= set(sets)
    for arch in bq.ARCHS:
        assert (ROOT / "configs" / f"{arch}.yaml").is_file()
    for variant in bq.VARIANTS + bq.EXTRA_VARIANTS:
        assert (ROOT / "configs" / "variants" / f"{variant}.yaml").is_file()


def test_train_command_configs_validate():
    """Every (arch, variant) command's configs and --set overrides pass the config validation."""
    from megatron_moe_spec.run_config import load_run_config, validate_for_world_size

    for arch in bq.ARCHS:
        for variant in bq.VARIANTS + bq.EXTRA_VARIANTS:
            for iters, nproc in ((10, 1), (300, 2)):
                cmd = bq.train_command(arch, variant, 1234, iters, nproc, "/d", "/o/r", python="PY", master_port=1)
                train = cmd[cmd.index("train") + 1:]
                configs = train[:2]
                sets = [train[i + 1] for i, a in enumerate(train) if a == "--set"]
                cfg = load_run_config(configs, sets, check_paths=False)
                validate_for_world_size(cfg, nproc)


def test_grid_skips_complete_runs_and_restarts_unfinished(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    complete = bq.run_dir(out, "tiny_vanilla", "lb", 1234)
    partial = bq.run_dir(out, "tiny_vanilla", "lb", 1235)
    _write_metrics(complete, [{"step": 5}, {"step": 10, "val_lm_loss": 2.0}])
    _write_metrics(partial, [{"step": 5, "lm_loss": 3.0}])
    with open(os.path.join(partial, "stale"), "w") as f:
        f.write("x")
    assert bq.is_complete(complete, 10) and not bq.is_complete(partial, 10) and not bq.is_complete(out, 10)
    steps = [(a, v, s, done) for a, v, s, _, done in bq.plan(out, ["tiny_vanilla"], ["lb", "lb_sp"], 2, 10)]
    assert steps == [("tiny_vanilla", "lb", 1234, True), ("tiny_vanilla", "lb_sp", 1234, False),  # seed-major
                     ("tiny_vanilla", "lb", 1235, False), ("tiny_vanilla", "lb_sp", 1235, False)]

    calls = []

    def fake_run(cmd, cwd, env, stdout, stderr):  # "trains": writes the final record, and a checkpoint
        rdir = next(a for a in cmd if a.startswith("logging.run_dir=")).split("=", 1)[1]
        calls.append(rdir)
        assert not os.path.exists(os.path.join(rdir, "stale"))  # the unfinished run was started over
        seed = int(rdir.rsplit("_", 1)[1])
        _write_metrics(rdir, [{"step": 10, "val_lm_loss": 1.0 + (seed - 1234), "load_cv": 0.1}])
        os.makedirs(os.path.join(rdir, "checkpoints"))
        return subprocess.CompletedProcess(cmd, 1 if rdir.endswith(os.path.join("lb_sp", "seed_1235")) else 0)

    monkeypatch.setattr(bq.subprocess, "run", fake_run)
    failed = bq.run_grid(out, ["tiny_vanilla"], ["lb", "lb_sp"], 2, 10, 1, "/d", log=lambda *a: None)
    assert calls == [bq.run_dir(out, "tiny_vanilla", "lb_sp", 1234), partial, bq.run_dir(out, "tiny_vanilla", "lb_sp", 1235)]
    assert failed == [bq.run_dir(out, "tiny_vanilla", "lb_sp", 1235)]
    assert not os.path.exists(os.path.join(partial, "checkpoints"))  # dropped unless --keep-checkpoints
    assert os.path.isfile(partial + ".log")

    calls.clear()
    bq.run_grid(out, ["tiny_vanilla"], ["lb"], 2, 10, 1, "/d", log=lambda *a: None)
    assert calls == []  # everything complete: nothing trains
    groups = bq.collect(out, ["tiny_vanilla"], ["lb", "lb_sp"], 2, 10)
    assert {k: len(v) for k, v in groups.items()} == {("tiny_vanilla", "lb"): 2, ("tiny_vanilla", "lb_sp"): 2}


def test_cli_defaults_and_dry_run(tmp_path, capsys):
    a = bq.parse_args(["--out", str(tmp_path)])
    assert (a.variants, a.archs, a.seeds, a.iters, a.nproc) == (list(bq.VARIANTS), list(bq.ARCHS), 3, 300, 2)
    assert a.table == os.path.join(str(tmp_path), "table.md") and a.data == str(ROOT / "data" / "bench_quality")
    q = bq.parse_args(["--quick", "--out", str(tmp_path), "--seeds", "2"])
    assert (q.variants, q.archs, q.seeds, q.iters, q.nproc) == (list(bq.QUICK_VARIANTS), ["tiny_vanilla"], 2, 10, 1)
    assert bq.main(["--quick", "--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("megatron_moe_spec train" in line for line in lines)


def test_aggregate_only_writes_the_table(tmp_path, capsys):
    out = str(tmp_path / "out")
    for seed in (1234, 1235):
        write_synthetic_run(bq.run_dir(out, "tiny_vanilla", "lb", seed), seed=seed, train_steps=20, log_interval=10,
                            eval_interval=10)
    rc = bq.main(["--aggregate-only", "--out", out, "--archs", "tiny_vanilla", "--variants", "lb", "lb_sp",
                  "--seeds", "2", "--iters", "20", "--nproc", "1"])
    assert rc == 1  # lb_sp has no runs: reported, and left out of the table
    text = open(os.path.join(out, "table.md")).read()
    assert "| tiny_vanilla | lb | 2 |" in text and "lb_sp" not in text
    assert "2 run(s) of the grid are not complete" in capsys.readouterr().err


# ----------------------------------------------------------------------------- per domain, issue 13's grids
def test_per_domain_and_test_perplexity_and_balance_by_hand(tmp_path):
    """val_ppl/<domain> and test_ppl from the last logged losses; paired per-domain differences in %;
    "balance gives" when the mean MaxVio is above 1.2 x lb's; the table's per-domain columns."""
    def run(variant, seed, scale, max_vio):
        d = str(tmp_path / variant / f"seed_{seed}")
        _write_metrics(d, [{"step": 5, "val_lm_loss": 9.0, "val_lm_loss/prose": 9.0, "max_vio": 9.0},
                           {"step": 10, "val_lm_loss": math.log(10 * scale), "val_lm_loss/prose": math.log(8 * scale),
                            "val_lm_loss/code": math.log(12 * scale), "test_lm_loss": math.log(11 * scale),
                            "max_vio": max_vio}])
        return d
    groups = {("A", "lb"): [run("lb", 1, 1.0, 0.30), run("lb", 2, 2.0, 0.30)],
              ("A", "lb_sp_cp_x10"): [run("lb_sp_cp_x10", 1, 0.9, 0.40), run("lb_sp_cp_x10", 2, 1.9, 0.40)],
              ("A", "lb_sp_cp"): [run("lb_sp_cp", 1, 1.0, 0.35), run("lb_sp_cp", 2, 2.0, 0.35)]}
    rows = bq.aggregate(groups)
    lb, x10, x1 = rows
    assert lb["domains"] == ["prose", "code"]
    assert lb["val_ppl/prose"]["mean"] == pytest.approx(12.0) and lb["val_ppl/code"]["mean"] == pytest.approx(18.0)
    assert lb["test_ppl"]["mean"] == pytest.approx(16.5)
    ds = [100 * (0.9 - 1), 100 * (1.9 / 2 - 1)]  # -10%, -5%: the same for every domain and the test split
    for key in ("val_ppl", "val_ppl/prose", "val_ppl/code", "test_ppl"):
        assert bq.seed_differences(rows, x10, key) == pytest.approx(ds), key
        assert x10["paired"][key]["mean"] == pytest.approx(-7.5) and x10["paired"][key]["below"] == 2
    assert x10["paired"]["max_vio"]["mean"] == pytest.approx(0.10)  # metrics: plain differences
    assert (lb["balance_gives"], x10["balance_gives"], x1["balance_gives"]) == (None, True, False)  # 0.40 > 0.36
    assert bq.best_coefficients(rows) == {"A": 10.0}
    assert bq.findings(rows) == {"best_coefficient": {"A": 10.0}, "balance_gives_from": {"A": 10.0}}
    text = bq.markdown_table(rows)
    header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    assert header[5:8] == ["val ppl prose", "val ppl code", "test ppl"]
    ppl_table = text[text.index("### Perplexity against lb"):].splitlines()
    cols = [c.strip() for c in ppl_table[2].strip("|").split("|")]
    assert cols == ["arch", "variant", "seeds", "val", "val prose", "val code", "test", "test prose", "test code",
                    "balance gives"]
    cells = [c.strip() for c in ppl_table[4].strip("|").split("|")]
    assert cells[1] == "lb_sp_cp_x10" and cells[4].startswith("-7.50% [") and cells[4].endswith("(2/2)")
    assert cells[-1].startswith("yes") and cells[7] == "–"  # no per-domain test loss logged


def test_variant_names_and_their_configs():
    assert bq.variant_name(("sp", "cp"), 1) == "lb_sp_cp" and bq.variant_name(("cp", "sp"), 30) == "lb_sp_cp_x30"
    assert bq.variant_name(("sp",), 10, 16) == "lb_sp_x10_sub16" and bq.variant_name(("o_v",), 2.5) == "lb_o_v_x2.5"
    p = bq.parse_variant("lb_sp_cp_x30")
    assert p["coeffs"] == {"sp_coeff": pytest.approx(6e-2), "cp_coeff": pytest.approx(3e-2), "ortho_coeff": 0.0,
                           "var_coeff": 0.0} and p["sub"] is None
    assert bq.parse_variant("lb_o_v_x10")["coeffs"] == {"sp_coeff": 0.0, "cp_coeff": 0.0,
                                                        "ortho_coeff": pytest.approx(2e-2), "var_coeff": pytest.approx(1e-2)}
    for bad in ("lb_cp_sp_x3", "lb_sp_sp_x3", "lb_sp_cp", "lb_cp_x3_sub4", "lb_x3", "lb_sp_x3_sub0"):
        assert bq.parse_variant(bad) is None, bad
    with pytest.raises(ValueError, match="lb_sp_cp_x30"):
        bq.check_variant("lb_cp_sp_x3")
    # the YAMLs that the grammar also names hold the coefficients the grammar gives them
    for variant, terms, mult in (("lb_sp_cp_x10", ("sp", "cp"), 10), ("lb_sp_cp", ("sp", "cp"), 1),
                                 ("lb_sp", ("sp",), 1), ("lb_cp", ("cp",), 1), ("lb_o_v", ("o_v",), 1)):
        coeffs, sub = bq.variant_coefficients(variant)
        expected = bq.parse_variant(bq.variant_name(terms, mult) if mult != 1 else f"{variant}_x1")["coeffs"]
        assert coeffs == pytest.approx(expected) and sub is None, variant
        assert bq.multiplier(variant) == pytest.approx(mult)
    assert bq.multiplier("lb") is None
    # generated variants: lb.yaml plus the coefficients; budgets: 1/4 and 1/16 of 4 x 128 tokens
    configs, sets = bq.variant_args("tiny_vanilla", "lb_sp_x10_sub16")
    assert configs == [str(ROOT / "configs" / "variants" / "lb.yaml")]
    assert "specialization.sp_max_tokens=32" in sets and "specialization.sp_coeff=0.02" in sets
    assert "specialization.sp_max_tokens=128" in bq.variant_args("tiny_deepseek", "lb_sp_x10_sub4")[1]
    assert bq.micro_batch_tokens("tiny_vanilla") == 512


def test_grids_runs_and_their_configs_validate():
    from megatron_moe_spec.run_config import load_run_config, validate_for_world_size

    coef = {a: 10.0 for a in bq.ARCHS}
    sizes = {name: len(bq.grid_runs(name, bq.ARCHS, coef)) for name in bq.GRIDS}
    assert sizes == {"sweep": 30, "seeds5": 30, "ablation": 24, "baseline": 18, "budget": 24}
    distinct = {r for name in bq.GRIDS for r in bq.grid_runs(name, bq.ARCHS, coef)}
    assert len(distinct) == 72  # the grids share lb, the sweep's seeds and lb_sp_x10
    sweep = bq.grid_runs("sweep", bq.ARCHS, {})
    assert [v for a, v, s in sweep[:5]] == ["lb", "lb_sp_cp", "lb_sp_cp_x3", "lb_sp_cp_x10", "lb_sp_cp_x30"]
    assert [s for _, _, s in sweep] == sorted(s for _, _, s in sweep)  # seed-major
    assert {v for _, v, _ in bq.grid_runs("budget", ["tiny_vanilla"], coef)} == {
        "lb", "lb_sp_x10", "lb_sp_x10_sub4", "lb_sp_x10_sub16"}
    assert {v for _, v, _ in bq.grid_runs("seeds5", ["tiny_vanilla"], {"tiny_vanilla": 1.0})} == {"lb", "lb_sp_cp"}
    assert {v for _, v, _ in bq.grid_runs("ablation", ["tiny_vanilla"], {"tiny_vanilla": 3.0})} == {
        "lb", "lb_sp_x3", "lb_cp_x3", "lb_sp_cp_x3"}
    assert len(bq.grid_runs("sweep", ["tiny_vanilla"], {}, seeds=2, variants=["lb", "lb_sp_cp_x10"])) == 4
    with pytest.raises(ValueError, match="--coef"):
        bq.grid_runs("ablation", ["tiny_vanilla"], {})
    for arch, variant in sorted({(a, v) for a, v, _ in distinct}):
        cmd = bq.train_command(arch, variant, 1234, 1000, 2, "/d", "/o/r", python="PY", master_port=1)
        train = cmd[cmd.index("train") + 1:]
        configs = [x for x in train[:2] if x.endswith(".yaml")]
        sets = [train[i + 1] for i, x in enumerate(train) if x == "--set"]
        cfg = load_run_config(configs, sets, check_paths=False)
        validate_for_world_size(cfg, 2)
        coeffs, sub = bq.variant_coefficients(variant)
        assert cfg.specialization.sp_coeff == pytest.approx(coeffs["sp_coeff"]), (arch, variant)
        assert cfg.specialization.var_coeff == pytest.approx(coeffs["var_coeff"]), (arch, variant)
        assert cfg.specialization.sp_max_tokens == (512 // sub if sub else None), (arch, variant)


def _fake_trainer(calls):
    def fake_run(cmd, cwd, env, stdout, stderr):  # "trains": the final record, with domains and test
        rdir = next(a for a in cmd if a.startswith("logging.run_dir=")).split("=", 1)[1]
        calls.append(rdir)
        seed, variant = int(rdir.rsplit("_", 1)[1]), rdir.split(os.sep)[-2]
        better = 0.002 * (bq.multiplier(variant) or 0.0) * (1 + (seed % 2))  # larger coefficients "better"
        _write_metrics(rdir, [{"step": 10, "val_lm_loss": 3.0 - better + 0.1 * (seed - 1234),
                               "val_lm_loss/prose": 2.5 - better, "val_lm_loss/code": 3.5 - better,
                               "test_lm_loss": 3.1 - better, "max_vio": 0.3 + better}])
        return subprocess.CompletedProcess(cmd, 0)
    return fake_run


def test_grid_plan_estimate_and_resume(tmp_path, monkeypatch, capsys):
    """--plan lists the runs and the time; the grid writes its summary after every finished run, skips
    complete runs when run again, and --coef best follows the sweep's runs."""
    out, table = str(tmp_path / "out"), str(tmp_path / "res" / "sweep.md")
    common = ["--grid", "sweep", "--archs", "tiny_vanilla", "--variants", "lb", "lb_sp_cp_x10", "lb_sp_cp_x30",
              "--seeds", "2", "--iters", "10", "--out", out, "--table", table, "--no-plot", "--nproc", "1"]
    assert bq.main(common + ["--plan", "--run-minutes", "2", "4"]) == 0
    text = capsys.readouterr().out
    assert "grid sweep: 6 runs of 10 steps" in text and text.count("to train ") == 6
    assert "estimated training time 0 min - 0 min" in text  # 6 x 10 steps x 2-4 min / 1000 steps
    assert bq.estimate_minutes(6, 1000, (2.5, 3.0)) == (15.0, 18.0) and bq._hm(75) == "1 h 15 min"

    calls, writes = [], []
    monkeypatch.setattr(bq.subprocess, "run", _fake_trainer(calls))
    monkeypatch.setattr(bq, "prepare_corpus", lambda *a, **k: None)
    real_write = bq.write_table
    monkeypatch.setattr(bq, "write_table", lambda rows, path, *a: writes.append(len(rows)) or real_write(rows, path, *a))
    assert bq.main(common) == 0
    assert len(calls) == 6 and len(writes) == 7  # after each run, and once at the end
    data = json.load(open(str(tmp_path / "res" / "sweep.json")))
    assert data["meta"]["grid"] == "sweep" and data["meta"]["runs_complete"] == 6
    assert data["meta"]["findings"]["best_coefficient"] == {"tiny_vanilla": 30.0}
    x30 = next(r for r in data["rows"] if r["variant"] == "lb_sp_cp_x30")
    assert x30["paired"]["val_ppl"]["ci_low"] is not None and x30["paired"]["val_ppl/prose"]["n"] == 2
    md = open(table).read()
    assert "val ppl prose" in md and "test ppl" in md and "[95% CI]" in md and "SMOKE RUN" in md

    calls.clear()
    assert bq.main(common) == 0 and calls == []  # resumed: everything complete, nothing trains
    capsys.readouterr()
    assert bq.main(common + ["--plan"]) == 0
    text = capsys.readouterr().out
    assert "6 complete, 0 to train" in text and "to train  " not in text and "estimated training time 0 min" in text
    # --coef best: the sweep's best in --out, per arch; an unknown one is an error naming the fix
    coef, how = bq.resolve_coef("best", out, ["tiny_vanilla"], 10)
    assert coef == {"tiny_vanilla": 30.0} and how == "the sweep's best"
    with pytest.raises(ValueError, match="run --grid sweep first"):
        bq.resolve_coef("best", out, ["tiny_deepseek"], 10)
    assert bq.resolve_coef("best", out, ["tiny_deepseek"], 10, for_plan=True)[0] == {"tiny_deepseek": 10.0}
    assert bq.resolve_coef("3", out, ["tiny_deepseek"], 10)[0] == {"tiny_deepseek": 3.0}
    calls.clear()
    abl = ["--grid", "ablation", "--archs", "tiny_vanilla", "--seeds", "2", "--iters", "10", "--out", out,
           "--table", str(tmp_path / "res" / "abl.md"), "--no-plot", "--nproc", "1"]
    assert bq.main(abl) == 0
    assert sorted({c.split(os.sep)[-2] for c in calls}) == ["lb_cp_x30", "lb_sp_x30"]  # lb, x30: reused


# ----------------------------------------------------------------------------- end to end (slow)
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_end_to_end(tmp_path):
    out = str(tmp_path / "bq")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quality.py"), "--quick", "--out", out],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.load(open(os.path.join(out, "table.json")))
    assert [(r["arch"], r["variant"]) for r in data["rows"]] == [("tiny_vanilla", v) for v in bq.QUICK_VARIANTS]
    for row in data["rows"]:
        assert row["val_ppl"]["n"] == 1 and math.isfinite(row["val_ppl"]["mean"])
        assert row["domain_mi"]["n"] == 1
    rdir = bq.run_dir(out, "tiny_vanilla", "lb", bq.BASE_SEED)
    assert json.load(open(os.path.join(rdir, "domains.json")))["domains"] == ["prose", "code", "technical"]
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quality.py"), "--quick", "--out", out],
                           cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("skipped") == 2


def test_a_run_of_another_layout_is_retrained(tmp_path, monkeypatch):
    """A complete run trained with 2 processes (expert parallel 2: other initial expert weights) does not
    count for a 1-process grid: not complete, left out of the summary, and trained again."""
    out = str(tmp_path / "out")
    rdir = bq.run_dir(out, "tiny_vanilla", "lb", 1234)
    _write_metrics(rdir, [{"step": 10, "val_lm_loss": 2.0}], ep=2)
    assert bq.is_complete(rdir, 10) and bq.is_complete(rdir, 10, nproc=2) and not bq.is_complete(rdir, 10, nproc=1)
    assert bq.collect(out, ["tiny_vanilla"], ["lb"], 1, 10, nproc=1) == {}
    assert bq.collect(out, ["tiny_vanilla"], ["lb"], 1, 10, nproc=2) == {("tiny_vanilla", "lb"): [rdir]}
    calls = []

    def fake_run(cmd, cwd, env, stdout, stderr):
        calls.append(cmd)
        assert not os.path.exists(rdir)  # the other layout's run was removed before training again
        _write_metrics(rdir, [{"step": 10, "val_lm_loss": 2.0}], ep=1)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bq.subprocess, "run", fake_run)
    assert bq.run_grid(out, ["tiny_vanilla"], ["lb"], 1, 10, 1, "/d", log=lambda *a: None) == []
    assert len(calls) == 1 and "torch.distributed.run" not in calls[0]
    assert bq.is_complete(rdir, 10, nproc=1)


def test_jobs_train_runs_at_once_and_report_failures_in_plan_order(tmp_path, monkeypatch):
    """--jobs 2: two runs are in flight together (each waits for the other at a barrier: with one at a
    time the barrier times out); failures come back in the plan's order; on_done never runs twice at once."""
    out = str(tmp_path / "out")
    barrier = threading.Barrier(2, timeout=20)
    in_done, seen = [0], []

    def fake_run(cmd, cwd, env, stdout, stderr):
        rdir = next(a for a in cmd if a.startswith("logging.run_dir=")).split("=", 1)[1]
        barrier.wait()
        _write_metrics(rdir, [{"step": 10, "val_lm_loss": 2.0}])
        return subprocess.CompletedProcess(cmd, 1 if "lb_sp" in rdir else 0)

    def on_done():
        in_done[0] += 1
        assert in_done[0] == 1
        time.sleep(0.05)
        seen.append(1)
        in_done[0] -= 1

    monkeypatch.setattr(bq.subprocess, "run", fake_run)
    failed = bq.run_grid(out, ["tiny_vanilla"], ["lb", "lb_sp"], 2, 10, 1, "/d", log=lambda *a: None,
                         on_done=on_done, jobs=2)
    assert failed == [bq.run_dir(out, "tiny_vanilla", "lb_sp", s) for s in (1234, 1235)]
    assert len(seen) == 2
    a = bq.parse_args(["--grid", "sweep", "--plan"])
    assert a.nproc == 1 and a.jobs == max(1, (os.cpu_count() or 1)) and a.run_minutes == list(bq.RUN_MINUTES_1PROC)
    assert bq.parse_args(["--out", str(tmp_path)]).jobs == 1
    assert bq.estimate_minutes(3, 1000, (5.0, 6.0), jobs=2) == (10.0, 12.0)
