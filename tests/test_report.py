"""Tests of ``megatron-moe-spec report`` on synthetic run directories (no training needed)."""
from __future__ import annotations

import json
import math
import os
import re
import struct

import numpy as np
import pytest

from megatron_moe_spec.commands import report as report_cmd
from megatron_moe_spec.report import analysis, build, plots
from megatron_moe_spec.report.runs import load_run, load_runs
from megatron_moe_spec.report.synthetic import write_synthetic_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_IMAGES = (
    "loss_curves",
    "entropy_mean",
    "entropy_layers",
    "load_balance",
    "tokens_per_expert",
    "expert_domain",
    "transition",
    "similarity",
    "metrics_overview",
)


# ---------------------------------------------------------------------- helpers
def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summary_cell(html, run, metric, stat):
    m = re.search(
        rf'data-run="{re.escape(run)}" data-metric="{re.escape(metric)}" data-stat="{stat}"[^>]*>([^<]+)<', html
    )
    assert m, f"no summary cell for {run} {metric} {stat}"
    return float(m.group(1))


def check_images(report, out_dir, expected_stems, fmt="png"):
    files = {img.filename for img in report.images}
    assert files == {f"{s}.{fmt}" for s in expected_stems}
    html = open(os.path.join(out_dir, "report.html")).read()
    for img in report.images:
        path = os.path.join(out_dir, img.filename)
        assert os.path.getsize(path) > 5000, f"{img.filename} is suspiciously small"
        assert f'src="{img.filename}"' in html
        if fmt == "png":
            w, h = png_size(path)
            assert (w, h) == (img.width, img.height)
            assert 500 <= w <= 3000 and 350 <= h <= 4000, (img.filename, w, h)
            # decodes as an image of that size
            import matplotlib.image as mpimg

            assert mpimg.imread(path).shape[:2] == (h, w)
    return html


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_synthetic_run(str(root / "spec"), name="synthetic-spec", seed=0)
    write_synthetic_run(str(root / "baseline"), name="synthetic-baseline", specialization=False, seed=1)
    write_synthetic_run(str(root / "plain"), name="plain", specialization=False, domains=None,
                        eval_interval=None, seed=2)
    return root


@pytest.fixture(scope="module")
def single(runs_dir):
    run_dir = str(runs_dir / "spec")
    rep = build.generate_report([run_dir])  # one run: the default output is RUN_DIR/report/
    out = os.path.join(run_dir, "report")
    assert rep.output_dir == os.path.abspath(out)
    return run_dir, out, rep


@pytest.fixture(scope="module")
def captured(runs_dir, tmp_path_factory):
    """A two-run report with the heatmap plotting wrapped to record the panels it is handed."""
    seen = {}
    original = plots.plot_heatmaps

    def spy(runs, panels, title, *args, **kwargs):
        seen[title] = panels
        return original(runs, panels, title, *args, **kwargs)

    out = str(tmp_path_factory.mktemp("cmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "plot_heatmaps", spy)
        rep = build.generate_report([str(runs_dir / "spec"), str(runs_dir / "baseline")], output=out)
    return rep, out, seen


# ---------------------------------------------------------------------- one and two runs
def test_single_run_writes_every_plot_and_the_page(single):
    run_dir, out, rep = single
    assert set(ALL_IMAGES) == set(build.IMAGE_STEMS)
    html = check_images(rep, out, ALL_IMAGES)
    assert png_size(os.path.join(out, "entropy_mean.png")) == (800, 450)  # 8 x 4.5 in at 100 dpi
    # 3 layers of 8x8 in one row: 3 panels of 4.76 x 4.66 in + colour bar and title margins
    assert png_size(os.path.join(out, "similarity.png")) == (1558, 546)
    assert "synthetic-spec" in html
    for section in ("losses", "entropy", "load", "domain", "transition", "similarity"):
        assert f'<section id="{section}">' in html
    # the summary table agrees with metrics.jsonl
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    lm = [r["lm_loss"] for r in records]
    assert summary_cell(html, "synthetic-spec", "lm_loss", "last") == pytest.approx(lm[-1], rel=1e-3)
    assert summary_cell(html, "synthetic-spec", "lm_loss", "min") == pytest.approx(min(lm), rel=1e-3)
    val = [r["val_lm_loss"] for r in records if "val_lm_loss" in r]
    assert summary_cell(html, "synthetic-spec", "val_lm_loss", "last") == pytest.approx(val[-1], rel=1e-3)
    ent = records[-1]["routing_entropy"]
    assert summary_cell(html, "synthetic-spec", "routing_entropy", "last") == pytest.approx(ent, rel=1e-3)
    # the resolved config, in a collapsible block
    assert "<details>" in html and "sp_coeff" in html and "SYNTHETIC" in html


def test_two_runs_side_by_side(captured, runs_dir):
    rep, out, _ = captured
    html = check_images(rep, out, ALL_IMAGES)
    for name, sub in (("synthetic-spec", "spec"), ("synthetic-baseline", "baseline")):
        assert name in html
        last = read_jsonl(str(runs_dir / sub / "metrics.jsonl"))[-1]
        assert summary_cell(html, name, "lm_loss", "last") == pytest.approx(last["lm_loss"], rel=1e-3)
        assert summary_cell(html, name, "load_cv", "last") == pytest.approx(last["load_cv"], rel=1e-3)
    # R_sp only in one run: its row has a value for that run and a dash for the other
    assert summary_cell(html, "synthetic-spec", "specialization_loss", "last") > 0
    assert 'data-run="synthetic-baseline" data-metric="specialization_loss"' not in html
    # both runs' configs are shown
    assert html.count("<details><summary>") >= 2
    # two runs side by side: one row per layer (3), one column per run (2)
    assert png_size(os.path.join(out, "similarity.png")) == (1082, 1478)


def test_several_runs_need_output(runs_dir, capsys):
    rc = report_cmd.main([str(runs_dir / "spec"), str(runs_dir / "baseline")])
    assert rc == 2
    assert "--output" in capsys.readouterr().err


# ---------------------------------------------------------------------- the numbers handed to the plots
def test_heatmaps_get_row_normalized_last_step_counts(captured, runs_dir):
    _, _, seen = captured
    domain = next(v for k, v in seen.items() if k.startswith("P(domain | expert)"))
    transition = next(v for k, v in seen.items() if k.startswith("top-1 transitions"))
    similarity = next(v for k, v in seen.items() if k.startswith("expert similarity"))
    last = read_jsonl(str(runs_dir / "spec" / "routing.jsonl"))[-1]
    assert [p.layer for p in domain["synthetic-spec"]] == [1, 2, 3]
    for panel in domain["synthetic-spec"]:
        counts = np.asarray(last["layers"][str(panel.layer)]["expert_domain"], dtype=float)
        assert panel.step == last["step"]
        live = counts.sum(1) > 0
        np.testing.assert_allclose(panel.matrix[live].sum(1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(panel.matrix[live], counts[live] / counts[live].sum(1, keepdims=True))
        assert panel.col_names == ["code", "math", "prose"]
    # transitions: one panel per adjacent pair (the last MoE layer has none), rows sum to 1
    assert [p.layer for p in transition["synthetic-spec"]] == [1, 2]
    assert "1 \u2192 2" in transition["synthetic-spec"][0].title
    for panel in transition["synthetic-spec"]:
        counts = np.asarray(last["layers"][str(panel.layer)]["transition"], dtype=float)
        np.testing.assert_allclose(panel.matrix, counts / counts.sum(1, keepdims=True))
    # similarity: the logged values, diagonal masked
    for panel in similarity["synthetic-spec"]:
        sim = np.asarray(last["layers"][str(panel.layer)]["similarity"], dtype=float)
        assert np.isnan(np.diag(panel.matrix)).all()
        off = ~np.eye(sim.shape[0], dtype=bool)
        np.testing.assert_array_equal(panel.matrix[off], sim[off])


def test_row_normalize_by_hand():
    p = analysis.row_normalize([[2, 6, 0], [0, 0, 0], [1, 1, 2]])
    np.testing.assert_allclose(p[0], [0.25, 0.75, 0.0])
    assert np.isnan(p[1]).all()  # an expert with no token: no data, not "0 everywhere"
    np.testing.assert_allclose(p[2], [0.25, 0.25, 0.5])
    with pytest.raises(ValueError):
        analysis.row_normalize([1, 2, 3])


def test_entropy_axis_zooms_to_the_data():
    """Normalized entropy near 1: the axis runs from a little below the smallest value to a little above
    1 (15% / 5% of 1 - min), never below 0; nothing finite: the full (0, 1.02)."""
    assert plots.unit_ylim([0.96, 0.99, float("nan"), None]) == pytest.approx((0.96 - 0.15 * 0.04, 1.0 + 0.05 * 0.04))
    assert plots.unit_ylim([0.2, 0.5]) == pytest.approx((0.2 - 0.15 * 0.8, 1.04))
    assert plots.unit_ylim([0.05]) == pytest.approx((0.0, 1.0 + 0.05 * 0.95))
    assert plots.unit_ylim([1.0]) == pytest.approx((1.0 - 0.0015, 1.0005))  # flat at 1: a 0.01 window
    assert plots.unit_ylim([float("nan")]) == (0.0, 1.02) and plots.unit_ylim([]) == (0.0, 1.02)


def test_dead_expert_row_is_gray_not_zero(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "lm_loss": 3.0}) + "\n")
    ed = [[2, 6, 0], [0, 0, 0], [1, 1, 2]]
    (run_dir / "routing.jsonl").write_text(
        json.dumps({"step": 1, "layers": {"1": {"tokens_per_expert": [8, 0, 4], "expert_domain": ed}}}) + "\n"
        + json.dumps({"step": 2, "layers": {"1": {"tokens_per_expert": [8, 0, 4]}}}) + "\n"
    )
    run = load_run(str(run_dir))
    (panel,) = plots.domain_panels(run, [1])
    assert panel.step == 1  # the last step that carries expert_domain
    assert np.isnan(panel.matrix[1]).all() and "expert 1" in panel.notes[0]
    assert panel.col_names == ["domain 0", "domain 1", "domain 2"]


def test_load_metrics_from_counts_match_the_logged_ones(runs_dir):
    run = load_run(str(runs_dir / "spec"))
    for layer in run.routing_layers:
        steps, counts = run.tokens_matrix(layer)
        s_cv, cv = run.series(f"load_cv/layer_{layer}")
        np.testing.assert_array_equal(steps, s_cv)
        np.testing.assert_allclose(analysis.load_cv(counts), cv, rtol=1e-4)
        _, mv = run.series(f"max_vio/layer_{layer}")
        np.testing.assert_allclose(analysis.max_vio(counts), mv, rtol=1e-4, atol=1e-6)
        ratio = analysis.load_ratio(counts)
        np.testing.assert_allclose(ratio.mean(0), 1.0)
    assert analysis.load_cv([4, 4, 4, 4]) == 0.0
    assert analysis.max_vio([6, 2, 2, 2]) == pytest.approx(6 / 3 - 1)


def test_summary_statistics():
    stat = analysis.last_and_min([1, 2, 3, 4], [5.0, 2.0, float("nan"), 3.0])
    assert (stat.last, stat.last_step, stat.min, stat.min_step) == (3.0, 4, 2.0, 2)
    diverged = analysis.last_and_min([1, 2], [2.0, float("nan")])
    assert math.isnan(diverged.last) and diverged.min == 2.0
    assert analysis.fmt(2.345678) == "2.346" and analysis.fmt(3.0) == "3" and analysis.fmt(float("nan")) == "nan"
    ma = analysis.moving_average([1.0, float("nan"), 3.0, 5.0, 7.0], 3)
    np.testing.assert_allclose(ma, [1.0, 2.0, 4.0, 5.0, 6.0])  # NaN ignored, shrinking ends, no lag
    assert analysis.smoothing_window(40) is None and analysis.smoothing_window(2000) == 51


# ---------------------------------------------------------------------- missing optional data
def test_missing_optional_data_omits_sections(runs_dir, tmp_path):
    out = str(tmp_path / "plain_report")
    rep = build.generate_report([str(runs_dir / "plain")], output=out)
    html = check_images(rep, out, set(ALL_IMAGES) - {"expert_domain"})
    assert '<section id="domain">' not in html
    assert "expert_domain" in rep.omitted["domain"]
    assert 'data-metric="val_lm_loss"' not in html  # no validation
    assert 'data-metric="specialization_loss"' not in html  # no R_sp
    assert 'data-metric="domain_mi"' not in html


def test_run_without_routing_file(runs_dir, tmp_path):
    import shutil

    run_dir = tmp_path / "norouting"
    shutil.copytree(runs_dir / "baseline", run_dir)
    out = str(tmp_path / "out")
    build.generate_report([str(run_dir)], output=out)
    assert os.path.exists(os.path.join(out, "similarity.png"))
    (tmp_path / "out" / "notes.png").write_bytes(b"not ours")
    os.remove(run_dir / "routing.jsonl")
    rep = build.generate_report([str(run_dir)], output=out)
    # load CV/MaxVio still come from metrics.jsonl; the matrices are gone
    expected = {"loss_curves", "entropy_mean", "entropy_layers", "load_balance", "metrics_overview"}
    check_images(rep, out, expected)
    assert set(rep.omitted) == {"domain", "transition", "similarity"}
    # the earlier report's images that no longer apply are removed; other files are left alone
    assert sorted(os.listdir(out)) == sorted([f"{s}.png" for s in expected] + ["report.html", "notes.png"])


def test_minimal_metrics_only(tmp_path, capsys):
    run_dir = tmp_path / "minimal"
    run_dir.mkdir()
    lines = [json.dumps({"step": s, "lm_loss": 5.0 - s / 10}) for s in range(1, 11)]
    # a resumed run re-logs step 10, and the last line is half written
    lines.append(json.dumps({"step": 10, "lm_loss": 3.5}))
    lines.append(json.dumps({"step": 10, "val_lm_loss": 3.7}))  # evaluation logged on its own line
    lines.append('{"step": 11, "lm_lo')
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))
    assert report_cmd.main([str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert "malformed" in err and "omitted" in err
    html = open(run_dir / "report" / "report.html").read()
    assert 'src="loss_curves.png"' in html
    assert summary_cell(html, "minimal", "lm_loss", "last") == 3.5  # the re-logged record wins
    assert summary_cell(html, "minimal", "val_lm_loss", "last") == 3.7  # merged into step 10
    assert "no config.yaml" in html
    assert sorted(os.listdir(run_dir / "report")) == ["loss_curves.png", "report.html"]


def test_summary_shows_per_domain_and_test_perplexity(tmp_path):
    """val ppl overall and per domain (exp of the logged losses, last and minimum), the final test loss
    and test ppl; rows only for the keys a run logs."""
    run_dir = tmp_path / "dom"
    run_dir.mkdir()
    recs = [{"step": 5, "lm_loss": 4.0, "val_lm_loss": 3.0, "val_lm_loss/prose": 2.0, "val_lm_loss/code": 4.0},
            {"step": 10, "lm_loss": 3.5, "val_lm_loss": 3.2, "val_lm_loss/prose": 1.5, "val_lm_loss/code": 4.9,
             "test_lm_loss": 3.3, "test_lm_loss/prose": 1.7}]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    assert report_cmd.main([str(run_dir)]) == 0
    html = open(run_dir / "report" / "report.html").read()
    assert summary_cell(html, "dom", "val_ppl", "last") == pytest.approx(math.exp(3.2), rel=1e-3)
    assert summary_cell(html, "dom", "val_ppl", "min") == pytest.approx(math.exp(3.0), rel=1e-3)
    assert summary_cell(html, "dom", "val_ppl/prose", "last") == pytest.approx(math.exp(1.5), rel=1e-3)
    assert summary_cell(html, "dom", "val_ppl/code", "min") == pytest.approx(math.exp(4.0), rel=1e-3)
    assert summary_cell(html, "dom", "test_lm_loss", "last") == 3.3
    assert summary_cell(html, "dom", "test_ppl/prose", "last") == pytest.approx(math.exp(1.7), rel=1e-3)
    assert 'data-metric="test_ppl/code"' not in html and "perplexity (validation, prose)" in html


# ---------------------------------------------------------------------- errors and options
def test_missing_run_dir_exit_code_2(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert report_cmd.main([missing]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and missing in err


def test_run_dir_without_metrics_exit_code_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report_cmd.main([str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "metrics.jsonl").write_text("\n")
    assert report_cmd.main([str(tmp_path / "blank")]) == 2
    assert "no metrics records" in capsys.readouterr().err


def test_layers_subset(runs_dir, tmp_path, capsys):
    out = str(tmp_path / "l2")
    rep = build.generate_report([str(runs_dir / "spec")], output=out, layers="2")
    assert rep.layers == {"synthetic-spec": [2]}
    run = load_run(str(runs_dir / "spec"))
    assert [p.layer for p in plots.domain_panels(run, rep.layers["synthetic-spec"])] == [2]
    assert build.parse_layers("1,3,5-7") == [1, 3, 5, 6, 7]
    with pytest.raises(build.ReportError):
        build.parse_layers("a-b")
    # layer 0 is dense: nothing to show is a usage error
    assert report_cmd.main([str(runs_dir / "spec"), "--layers", "0", "-o", str(tmp_path / "x")]) == 2
    assert "MoE layers: [1, 2, 3]" in capsys.readouterr().err


def test_svg_format(runs_dir, tmp_path):
    out = str(tmp_path / "svg")
    assert report_cmd.main([str(runs_dir / "plain"), "--format", "svg", "-o", out]) == 0
    html = open(os.path.join(out, "report.html")).read()
    for stem in set(ALL_IMAGES) - {"expert_domain"}:
        path = os.path.join(out, f"{stem}.svg")
        assert open(path).read(200).lstrip().startswith("<?xml")
        assert f'src="{stem}.svg"' in html


def test_run_names(tmp_path):
    a = tmp_path / "a" / "run"
    b = tmp_path / "b" / "run"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "lm_loss": 1.0}) + "\n")
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "metrics.jsonl").write_text(json.dumps({"step": 1, "lm_loss": 1.0}) + "\n")
    (tmp_path / "named" / "config.yaml").write_text("run:\n  name: my-exp\n")
    runs = load_runs([str(a), str(b), str(tmp_path / "named")])
    assert [r.name for r in runs] == ["a/run", "b/run", "my-exp"]


def test_module_entry_point(runs_dir, tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "megatron_moe_spec.commands.report", str(tmp_path / "missing")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert isinstance(report_cmd.HELP, str) and report_cmd.HELP


def test_nan_null_and_partial_metrics(tmp_path):
    run_dir = tmp_path / "diverged"
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in range(1, 50):
            rec = {"step": s, "lm_loss": float("nan") if s > 45 else 10 / s, "routing_entropy": None,
                   "load_cv/layer_3": 0.2}
            f.write(json.dumps(rec) + "\n")  # json writes NaN, as Python's logger would
        f.write('{"step": 50, "lm_loss": Infinity}\n')
    rep = build.generate_report([str(run_dir)])
    out = str(run_dir / "report")
    html = check_images(rep, out, {"loss_curves", "load_balance"})  # null entropy: no entropy plot
    assert "entropy" in rep.omitted
    cell = re.search(r'data-metric="lm_loss" data-stat="last"[^>]*>([^<]+)<', html).group(1)
    assert cell == "inf"  # the diverged end is reported, not hidden
    assert summary_cell(html, "diverged", "lm_loss", "min") == pytest.approx(10 / 45, rel=1e-3)


# ---------------------------------------------------------------------- domain names
def test_domain_names_from_the_run_dirs_domains_json(tmp_path):
    """The driver writes RUN_DIR/domains.json (training.reporting.write_domain_names); the report's
    expert x domain panels take their column names from it (before the config, before numbers)."""
    from megatron_moe_spec.training.reporting import write_domain_names

    run_dir = str(tmp_path / "run")
    # a run whose config has no domain names (like a real run's resolved config)
    write_synthetic_run(run_dir, domains=("a", "b", "c"), extra_config={"data": {"type": "indexed"}})
    assert load_run(run_dir).domain_names(3) == ["domain 0", "domain 1", "domain 2"]

    assert write_domain_names(run_dir, None) is None and write_domain_names(run_dir, []) is None
    path = write_domain_names(run_dir, ["prose", "code", "technical"])
    assert path == os.path.join(run_dir, "domains.json")
    with open(path) as f:
        assert json.load(f) == {"domains": ["prose", "code", "technical"]}
    run = load_run(run_dir)
    assert run.domains == ["prose", "code", "technical"]
    assert run.domain_names(3) == ["prose", "code", "technical"]
    assert run.domain_names(2) == ["domain 0", "domain 1"]  # a count mismatch is not trusted
    panels = plots.domain_panels(run, run.routing_layers)
    assert panels and all(p.col_names == ["prose", "code", "technical"] for p in panels)

    with open(path, "w") as f:
        f.write("{not json")
    run = load_run(run_dir)
    assert run.domains is None and any("domains.json" in w for w in run.warnings)
