#!/usr/bin/env python
"""The quality benchmark (issue 6, "the paper's Table at small scale"): train a grid of loss variants x
architectures x seeds on the offline multi-domain corpus and tabulate validation perplexity and the
routing metrics per (architecture, variant), mean and standard deviation over the seeds. docs/results.md.

    PYTHONPATH=$PWD python scripts/bench_quality.py --out runs/bench_quality --table docs/results_table.md
    PYTHONPATH=$PWD python scripts/bench_quality.py --quick --out /tmp/bq --table /tmp/bq/table.md   # smoke
    PYTHONPATH=$PWD python scripts/bench_quality.py --aggregate-only --out runs/bench_quality --table T.md

Each run trains ``configs/<arch>.yaml`` + ``configs/variants/<variant>.yaml`` into its own run directory
``OUT/<arch>/<variant>/seed_<seed>/`` (its console output beside it, ``seed_<seed>.log``). A run whose
metrics.jsonl already reaches the last step is skipped, so an interrupted grid is continued by running the
same command again; an unfinished run is started over (the benchmark saves no intermediate checkpoints).
The corpus is prepared once (``--data``, reused when its manifest matches), as scripts/demo.sh does.

The table (``--table``, markdown; the same numbers and every run's values as JSON next to it, ``.json``;
a plot, ``.png``) has one row per (arch, variant): the number of finished seeds, validation perplexity
exp(last ``val_lm_loss``) and each routing metric (``METRICS``) averaged over the last 10% of the run, each
as mean +- sample standard deviation over the seeds (ddof 1; no std with one seed). A second table and the
plot pair every run with the ``lb`` run of the same arch and seed (same initial weights and data order)
and give the differences. ``aggregate`` is a pure function of run directories.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_moe_spec.run_records import METRICS_FILE, merge_by_step, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("lb", "lb_z", "lb_o_v", "lb_sp", "lb_cp", "lb_sp_cp", "lb_z_sp_cp")
ARCHS = ("tiny_vanilla", "tiny_deepseek")
#: Accepted by --variants but not run by default: probes beyond the issue's grid (docs/results.md).
EXTRA_VARIANTS = ("lb_sp_cp_x10",)
QUICK_VARIANTS = ("lb", "lb_sp_cp")
BASE_SEED = 1234  # configs/base/tiny.yaml's training.seed: seed i of the grid is BASE_SEED + i
#: The metrics of the table (metrics.jsonl keys, docs/design.md), after perplexity.
METRICS = ("routing_entropy", "topk_mass", "load_cv", "max_vio", "activation_similarity", "pathway_nmi",
           "domain_mi", "tokens_per_sec")
PPL = "val_ppl"
#: The paired comparison: each variant's val ppl against the baseline's of the same arch and seed.
BASELINE = "lb"
DELTA = "val_ppl_delta_pct"
#: The routing metrics are averaged over the last 10% of each run (they are logged per 5-step interval).
TAIL_FRACTION = 0.1
#: The corpus of the full benchmark: scripts/demo.sh's (3 domains x 400 kB, 512-token BPE).
DATA_ARGS = ("--vocab-size", "512", "--max-bytes-per-domain", "400000")
QUICK_DATA_ARGS = ("--tiny",)
DEFAULT_ITERS = 300
#: Evaluation of the full benchmark: every EVAL_INTERVAL steps and at the last, on the first EVAL_ITERS
#: global batches of the valid split (16 x 8 x 128 = 16,384 tokens, half of data/demo's valid split).
EVAL_INTERVAL = 100
EVAL_ITERS = 16
QUICK_ITERS = 10


# ------------------------------------------------------------------------------------------ the grid
def run_dir(out: str, arch: str, variant: str, seed: int) -> str:
    return os.path.join(out, arch, variant, f"seed_{seed}")


def read_metrics(path: str) -> List[dict]:
    """metrics.jsonl of a run directory, one merged record per step in step order (a resumed run
    re-logs steps: later values win; ``run_records``); malformed lines (a run killed mid-write) are
    skipped; [] without the file."""
    metrics_path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(metrics_path):
        return []
    ignored: List[str] = []
    return merge_by_step(read_jsonl(metrics_path, ignored), ignored, metrics_path)


def last_step(path: str) -> Optional[int]:
    records = read_metrics(path)
    return records[-1]["step"] if records else None


def is_complete(path: str, iters: int) -> bool:
    """The run's metrics.jsonl reaches step ``iters`` (the final record, with its validation loss)."""
    step = last_step(path)
    return step is not None and step >= iters


def data_overrides(data_dir: str) -> List[str]:
    return ["data.type=indexed", f"data.paths=[{data_dir}/indexed/corpus]",
            f"data.tokenizer_path={data_dir}/tokenizer"]


def train_command(arch: str, variant: str, seed: int, iters: int, nproc: int, data_dir: str, rdir: str,
                  python: str = sys.executable, master_port: Optional[int] = None) -> List[str]:
    """The argv of one run: ``megatron-moe-spec train`` (under torchrun when ``nproc`` > 1, then with
    expert parallelism ``nproc`` and the all-to-all dispatcher, as scripts/demo.sh)."""
    configs = [os.path.join(ROOT, "configs", f"{arch}.yaml"),
               os.path.join(ROOT, "configs", "variants", f"{variant}.yaml")]
    sets = data_overrides(data_dir) + [
        f"training.seed={seed}",
        f"training.train_iters={iters}",
        "checkpoint.save_interval=0",
        "checkpoint.resume=none",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        f"logging.run_dir={rdir}",
    ]
    if iters < 100:  # short runs (--quick, tests): warm-up must be shorter than the run; evaluate at the end
        sets += [f"training.lr_warmup_iters={max(1, iters // 5)}", f"eval.interval={iters}"]
    else:  # a larger fixed validation set than the tiny configs' 2 batches, evaluated less often
        sets += [f"eval.interval={EVAL_INTERVAL}", f"eval.iters={EVAL_ITERS}"]
    if nproc > 1:
        sets += [f"parallel.ep={nproc}", "model.moe_token_dispatcher_type=alltoall"]
    train = ["-m", "megatron_moe_spec", "train", *configs, *[a for s in sets for a in ("--set", s)]]
    if nproc <= 1:
        return [python, *train]
    port = master_port if master_port is not None else _free_port()
    return [python, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port), *train]


def grid(archs: Sequence[str], variants: Sequence[str], seeds: int) -> List[Tuple[str, str, int]]:
    """Seed-major: every cell gets its first seed before any gets its second, so a grid stopped early
    still covers every (arch, variant)."""
    return [(a, v, BASE_SEED + i) for i in range(seeds) for a in archs for v in variants]


def plan(out: str, archs, variants, seeds: int, iters: int):
    """[(arch, variant, seed, run_dir, done)] of the grid, ``done`` = skipped (already complete)."""
    return [(a, v, s, run_dir(out, a, v, s), is_complete(run_dir(out, a, v, s), iters))
            for a, v, s in grid(archs, variants, seeds)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def prepare_corpus(data_dir: str, quick: bool, python: str = sys.executable) -> None:
    """prepare-data into ``data_dir`` (a no-op when its manifest matches: reused)."""
    args = QUICK_DATA_ARGS if quick else DATA_ARGS
    subprocess.run([python, "-m", "megatron_moe_spec.commands.prepare_data", "--output", data_dir, *args],
                   cwd=ROOT, env=_env(), check=True)


def run_grid(out: str, archs, variants, seeds: int, iters: int, nproc: int, data_dir: str,
             keep_checkpoints: bool = False, python: str = sys.executable, log=print) -> List[str]:
    """Train every unfinished run of the grid, in order; returns the run directories that failed."""
    failed = []
    todo = plan(out, archs, variants, seeds, iters)
    for n, (arch, variant, seed, rdir, done) in enumerate(todo, 1):
        tag = f"[{n}/{len(todo)}] {arch} {variant} seed {seed}"
        if done:
            log(f"{tag}: complete ({rdir}), skipped")
            continue
        if os.path.exists(rdir):  # unfinished (interrupted or failed): start over
            shutil.rmtree(rdir)
        os.makedirs(os.path.dirname(rdir), exist_ok=True)
        cmd = train_command(arch, variant, seed, iters, nproc, data_dir, rdir, python)
        log_path = rdir + ".log"
        start = time.perf_counter()
        with open(log_path, "w") as logf:
            logf.write(" ".join(cmd) + "\n")
            logf.flush()
            rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=logf, stderr=subprocess.STDOUT).returncode
        took = time.perf_counter() - start
        if rc != 0 or not is_complete(rdir, iters):
            failed.append(rdir)
            log(f"{tag}: FAILED (exit {rc}) after {took:.0f}s; see {log_path}")
            continue
        if not keep_checkpoints:
            shutil.rmtree(os.path.join(rdir, "checkpoints"), ignore_errors=True)
        log(f"{tag}: done in {took:.0f}s")
    return failed


# ------------------------------------------------------------------------------------------ aggregation
def _last(records: List[dict], key: str) -> Optional[float]:
    """The last finite value of ``key`` (null/NaN records skipped); None when never logged."""
    for rec in reversed(records):
        value = rec.get(key)
        if _finite(value):
            return float(value)
    return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def tail_mean(records: List[dict], key: str, fraction: float = TAIL_FRACTION) -> Optional[float]:
    """Mean of the finite values of ``key`` logged in the last ``fraction`` of the run (records with
    step > (1 - fraction) * last step), which smooths the per-interval noise of the routing metrics;
    the last finite value when that window has none; None when never logged."""
    if not records:
        return None
    start = (1.0 - fraction) * records[-1]["step"]
    xs = [float(r[key]) for r in records if r["step"] > start and _finite(r.get(key))]
    return sum(xs) / len(xs) if xs else _last(records, key)


def run_values(records: List[dict]) -> Dict[str, Optional[float]]:
    """One run's table entries: ``val_ppl`` = exp(last val_lm_loss), then each of METRICS averaged
    over the last TAIL_FRACTION of the run (``tail_mean``)."""
    val = _last(records, "val_lm_loss")
    out = {PPL: math.exp(val) if val is not None else None}
    out.update({key: tail_mean(records, key) for key in METRICS})
    return out


def mean_std(values: Iterable[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean and sample standard deviation (ddof 1) of the values that are not None; std None for
    fewer than two values, both None for none."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"mean": mean, "std": std, "n": len(xs)}


def baseline_row(rows: List[dict], row: dict) -> Optional[dict]:
    """The BASELINE row of ``row``'s arch; None for the baseline itself and when the arch has none."""
    if row["variant"] == BASELINE:
        return None
    return next((r for r in rows if r["arch"] == row["arch"] and r["variant"] == BASELINE), None)


def seed_differences(rows: List[dict], row: dict, key: str) -> List[float]:
    """Per seed (run name) the row's ``key`` minus the BASELINE row's of the same arch and seed; for
    PPL the relative difference in %. Empty without a baseline (``baseline_row``)."""
    base = baseline_row(rows, row)
    if base is None:
        return []
    diff = (lambda v, b: 100.0 * (v / b - 1.0)) if key == PPL else (lambda v, b: v - b)
    return [diff(v[key], base["per_run"][s][key]) for s, v in row["per_run"].items()
            if s in base["per_run"] and v[key] is not None and base["per_run"][s][key] is not None]


def aggregate(groups: Dict[Tuple[str, str], Sequence[str]]) -> List[dict]:
    """Pure: ``{(arch, variant): [run_dir, ...]}`` -> one row per group, in the given order:
    ``{"arch", "variant", "seeds", "runs", "per_run": {run name: run_values}, PPL: {"mean", "std", "n"},
    metric: {...}, ..., DELTA: {...}, "wins": (k, n), "paired": {metric: {...}}}``.
    ``DELTA`` is the paired comparison with the BASELINE variant of the same arch:
    per seed (run directories with the same name) 100 * (ppl / baseline ppl - 1), mean and std over the
    seeds both have; ``wins`` counts the seeds where the variant's ppl is below the baseline's. Both
    are None for the baseline itself and when it has no run of a common seed. ``"paired"``: for each
    metric of PAIRED, ``paired_differences`` against the baseline (None without a baseline)."""
    rows = []
    for (arch, variant), dirs in groups.items():
        per_run = {os.path.basename(os.path.normpath(d)): run_values(read_metrics(d)) for d in dirs}
        row = {"arch": arch, "variant": variant, "seeds": len(dirs), "runs": list(dirs), "per_run": per_run}
        for key in (PPL,) + METRICS:
            row[key] = mean_std(r[key] for r in per_run.values())
        rows.append(row)
    for row in rows:  # the paired comparisons, once every row (the baseline's too) has its per-run values
        ds = seed_differences(rows, row, PPL)
        row[DELTA] = mean_std(ds) if ds else None
        row["wins"] = (sum(d < 0 for d in ds), len(ds)) if ds else None
        row["paired"] = {key: paired_differences(seed_differences(rows, row, key)) for key, _, _ in PAIRED} \
            if baseline_row(rows, row) else None
    return rows


def paired_differences(ds: List[float]) -> dict:
    """Mean and std of per-seed differences, and ``agree``: two or more seeds, all of one (nonzero) sign."""
    out = mean_std(ds)
    out["agree"] = len(ds) > 1 and (all(d > 0 for d in ds) or all(d < 0 for d in ds))
    return out


def collect(out: str, archs, variants, seeds: int, iters: int) -> Dict[Tuple[str, str], List[str]]:
    """The complete runs of the grid, grouped by (arch, variant) (groups without one are left out)."""
    groups: Dict[Tuple[str, str], List[str]] = {}
    for arch, variant, _, rdir, done in plan(out, archs, variants, seeds, iters):
        if done:
            groups.setdefault((arch, variant), []).append(rdir)
    return groups


COLUMNS = ((PPL, "val ppl", ".2f"), ("routing_entropy", "routing entropy", ".3f"),
           ("topk_mass", "top-k mass", ".3f"), ("load_cv", "load CV", ".3f"), ("max_vio", "MaxVio", ".3f"),
           ("activation_similarity", "act. similarity", ".3f"), ("pathway_nmi", "pathway NMI", ".3f"),
           ("domain_mi", "domain MI", ".3f"), ("tokens_per_sec", "tokens/s", ",.0f"))


#: The second table: each routing metric's paired difference against lb, (key, label, format).
PAIRED = (("routing_entropy", "routing entropy", "+.4f"), ("topk_mass", "top-k mass", "+.4f"),
          ("activation_similarity", "act. similarity", "+.4f"), ("pathway_nmi", "pathway NMI", "+.4f"),
          ("domain_mi", "domain MI", "+.4f"), ("load_cv", "load CV", "+.4f"), ("max_vio", "MaxVio", "+.4f"))


def _cell(stat: Dict[str, Optional[float]], fmt: str) -> str:
    if stat["mean"] is None:
        return "–"
    text = format(stat["mean"], fmt)
    return text if stat["std"] is None else f"{text} ± {format(stat['std'], fmt)}"


def _delta_cell(row: dict) -> str:
    stat, wins = row.get(DELTA), row.get("wins")
    if not stat or stat["mean"] is None:
        return "–"
    text = f"{stat['mean']:+.2f}%" + ("" if stat["std"] is None else f" ± {stat['std']:.2f}")
    return f"{text} ({wins[0]}/{wins[1]})"


def markdown_table(rows: List[dict], title: Optional[str] = None) -> str:
    """The rows as a markdown table: mean ± std over seeds (no ± with one seed, – when never logged)."""
    header = ["arch", "variant", "seeds", "val ppl", f"Δ ppl vs {BASELINE} (paired)"]
    header += [label for _, label, _ in COLUMNS[1:]]
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for row in rows:
        cells = [row["arch"], row["variant"], str(row["seeds"]), _cell(row[PPL], ".2f"), _delta_cell(row)]
        cells += [_cell(row[key], fmt) for key, _, fmt in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample std (ddof 1) over seeds. val ppl = exp(last val_lm_loss) on the fixed validation "
              "set. Δ ppl vs lb: per seed 100 * (ppl / ppl of lb with the same seed - 1), in %, then mean ± std; "
              "(k/n): the seeds where the variant is below lb. The routing metrics are means over MoE layers "
              f"(docs/design.md), averaged over the last {TAIL_FRACTION:.0%} of each run's steps."]
    paired = [row for row in rows if row.get("paired")]
    if paired:
        header = ["arch", "variant", "seeds"] + [label for _, label, _ in PAIRED]
        lines += ["", f"### Paired differences against {BASELINE} (same arch, same seed)", "",
                  "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(PAIRED)) + "|"]
        for row in paired:
            cells = [row["arch"], row["variant"], str(row["paired"][PAIRED[0][0]]["n"])]
            for key, _, fmt in PAIRED:
                stat = row["paired"][key]
                cells.append(_cell(stat, fmt).replace("± +", "± ") + (" *" if stat["agree"] else ""))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Per seed: the variant's value minus {BASELINE}'s with the same seed (the same initial "
                  "weights and data order), then mean ± sample std over the seeds; * = every seed's difference "
                  "has the same sign (two or more seeds)."]
    return "\n".join(lines) + "\n"


def write_table(rows: List[dict], path: str, title: Optional[str] = None, meta: Optional[dict] = None) -> str:
    """Write ``path`` (markdown) and ``path`` with .json (the rows and ``meta``); returns the markdown."""
    text = markdown_table(rows, title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"meta": meta or {}, "rows": rows}, f, indent=1)
        f.write("\n")
    return text


# ------------------------------------------------------------------------------------------ the plot
#: The figure's panels, (key, title): each the per-seed difference against the baseline (for PPL in %).
PLOT_PANELS = ((PPL, "val ppl (%)  [lower: better]"),
               ("activation_similarity", "expert activation similarity  [R_sp lowers]"),
               ("routing_entropy", "routing entropy  [lower: sharper]"),
               ("topk_mass", "top-k mass  [higher: more decisive]"),
               ("pathway_nmi", "pathway NMI, adjacent layers  [R_cp raises]"),
               ("load_cv", "load CV  [balance: not higher]"))


def plot_quality(rows: List[dict], path: str) -> None:
    """For each arch a block of PLOT_PANELS (2 x 3 panels): along x the variants other than the baseline,
    each seed's difference against the baseline with the same seed a dot, the mean a bar from 0 with the
    sample std as an error bar. The differences, not the levels: the seeds' levels differ more than the
    variants do (the table has the levels). Needs matplotlib (the ``report`` extra)."""
    from megatron_moe_spec.report.plots import new_figure, save  # matplotlib: imported only here
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != BASELINE]
    fig = new_figure(15.0, 6.2 * len(archs))
    axes = fig.subplots(2 * len(archs), 3, squeeze=False)
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for a, arch in enumerate(archs):
        color = colors[a % len(colors)]
        for ax, (key, title) in zip(axes[2 * a:2 * a + 2].ravel(), PLOT_PANELS):
            for x, variant in enumerate(variants):
                row = next((r for r in rows if r["arch"] == arch and r["variant"] == variant), None)
                xs = seed_differences(rows, row, key) if row else []
                if not xs:
                    continue
                ax.bar(x, sum(xs) / len(xs), 0.6, color=color, alpha=0.35, yerr=mean_std(xs)["std"], capsize=3)
                ax.plot([x] * len(xs), xs, "o", ms=3.5, color=color, alpha=0.9)
            ax.axhline(0.0, color="0.3", lw=0.8)
            ax.set_xlim(-0.6, len(variants) - 0.4)
            ax.set_title(f"{arch}: {title}", fontsize=10)
            ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Quality benchmark: difference against {BASELINE} with the same seed (same initial weights "
                 "and data); dots = seeds, bar = mean, error bar = std over seeds", fontsize=11)
    save(fig, path)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS + EXTRA_VARIANTS, metavar="VARIANT",
                   help=f"loss variants (configs/variants/; default: {' '.join(VARIANTS)}; also "
                        f"{' '.join(EXTRA_VARIANTS)})")
    p.add_argument("--archs", nargs="+", default=None, choices=ARCHS, metavar="ARCH",
                   help=f"architectures (configs/; default {' '.join(ARCHS)})")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per cell (default 3; seed i = {BASE_SEED}+i)")
    p.add_argument("--iters", type=int, default=None, help=f"training steps per run (default {DEFAULT_ITERS})")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per run (expert parallel = nproc; default 2)")
    p.add_argument("--out", default=os.path.join("runs", "bench_quality"), help="output root of the run dirs")
    p.add_argument("--data", default=None, help="corpus folder (default data/demo, with --quick OUT/data), "
                                               "prepared with the benchmark's settings: built when missing, "
                                               "reused when its manifest matches, rebuilt otherwise")
    p.add_argument("--table", default=None, help="markdown table path (default OUT/table.md); the JSON and a "
                                                "PNG plot of it (.json, .png) beside it")
    p.add_argument("--no-plot", action="store_true", help="write no PNG (the plot needs matplotlib)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {' '.join(QUICK_VARIANTS)} on tiny_vanilla, 1 seed, {QUICK_ITERS} steps, "
                        "1 process, the --tiny corpus (explicit options override)")
    p.add_argument("--aggregate-only", action="store_true", help="train nothing: tabulate the complete runs")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    a = p.parse_args(argv)
    q = a.quick
    a.variants = a.variants or list(QUICK_VARIANTS if q else VARIANTS)
    a.archs = a.archs or (["tiny_vanilla"] if q else list(ARCHS))
    a.seeds = a.seeds if a.seeds is not None else (1 if q else 3)
    a.iters = a.iters if a.iters is not None else (QUICK_ITERS if q else DEFAULT_ITERS)
    a.nproc = a.nproc if a.nproc is not None else (1 if q else 2)
    a.data = os.path.abspath(a.data or (os.path.join(a.out, "data") if q else os.path.join(ROOT, "data", "demo")))
    a.out = os.path.abspath(a.out)
    a.table = a.table or os.path.join(a.out, "table.md")
    if a.seeds < 1 or a.iters < 1 or a.nproc < 1:
        p.error("--seeds, --iters and --nproc must be positive")
    return a


def _shown(path: str) -> str:
    """``path`` relative to the checkout when it lies inside it, else as given."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith(os.pardir) else rel


def main(argv=None) -> int:
    a = parse_args(argv)
    failed: List[str] = []
    if a.dry_run:
        for arch, variant, seed, rdir, done in plan(a.out, a.archs, a.variants, a.seeds, a.iters):
            cmd = train_command(arch, variant, seed, a.iters, a.nproc, a.data, rdir, master_port=0)
            print(("# complete, skipped: " if done else "") + " ".join(cmd))
        return 0
    start = time.perf_counter()
    if not a.aggregate_only:
        prepare_corpus(a.data, a.quick)
        failed = run_grid(a.out, a.archs, a.variants, a.seeds, a.iters, a.nproc, a.data, a.keep_checkpoints)
    groups = collect(a.out, a.archs, a.variants, a.seeds, a.iters)
    rows = aggregate(groups)
    for row in rows:  # the JSON names the runs relative to the checkout, so it can be committed
        row["runs"] = [_shown(d) for d in row["runs"]]
    meta = {"archs": a.archs, "variants": a.variants, "seeds": a.seeds, "iters": a.iters, "nproc": a.nproc,
            "data": _shown(a.data), "out": _shown(a.out), "quick": a.quick, "failed": failed,
            "wall_s": round(time.perf_counter() - start, 1)}
    title = f"Quality benchmark{' (SMOKE RUN, --quick: not results)' if a.quick else ''}: {a.iters} steps, " \
            f"{a.seeds} seed(s), {a.nproc} process(es)"
    print(write_table(rows, a.table, title, meta), end="")
    print(f"wrote {a.table} and {os.path.splitext(a.table)[0]}.json")
    if rows and not a.no_plot:
        plot_quality(rows, os.path.splitext(a.table)[0] + ".png")
        print(f"wrote {os.path.splitext(a.table)[0]}.png")
    missing = len(grid(a.archs, a.variants, a.seeds)) - sum(len(v) for v in groups.values())
    if failed or missing:
        print(f"{missing} run(s) of the grid are not complete" + (f"; failed: {', '.join(failed)}" if failed else ""),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
