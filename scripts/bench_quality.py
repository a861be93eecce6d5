#!/usr/bin/env python
"""The quality benchmark (issue 6, "the paper's Table at small scale"): train a grid of loss variants x
architectures x seeds on the offline multi-domain corpus and tabulate validation perplexity and the
routing metrics per (architecture, variant), mean and standard deviation over the seeds. docs/results.md.

    PYTHONPATH=$PWD python scripts/bench_quality.py --out runs/bench_quality --table docs/results_table.md
    PYTHONPATH=$PWD python scripts/bench_quality.py --quick --out /tmp/bq --table /tmp/bq/table.md   # smoke
    PYTHONPATH=$PWD python scripts/bench_quality.py --aggregate-only --out runs/bench_quality --table T.md
    PYTHONPATH=$PWD python scripts/bench_quality.py --grid sweep --plan        # issue 13's grids: the runs, the time
    PYTHONPATH=$PWD python scripts/bench_quality.py --grid sweep              # train them, docs/results/sweep.json

Each run trains ``configs/<arch>.yaml`` + ``configs/variants/<variant>.yaml`` into its own run directory
``OUT/<arch>/<variant>/seed_<seed>/`` (its console output beside it, ``seed_<seed>.log``). A run whose
metrics.jsonl already reaches the last step is skipped, so an interrupted grid is continued by running the
same command again; an unfinished run is started over (the benchmark saves no intermediate checkpoints).
The corpus is prepared once (``--data``, reused when its manifest matches), as scripts/demo.sh does.

The table (``--table``, markdown; the same numbers and every run's values as JSON next to it, ``.json``;
a plot, ``.png``) has one row per (arch, variant): the number of finished seeds, validation perplexity
exp(last ``val_lm_loss``: the mean over domains of each domain's loss), per domain exp(last
``val_lm_loss/<domain>``), test perplexity (the final evaluation's ``test_lm_loss``) and each routing
metric (``METRICS``) averaged over the last 10% of the run, each as mean +- sample standard deviation over
the seeds (ddof 1; no std with one seed). The paired tables and the plot pair every run with the ``lb`` run
of the same arch and seed (same initial weights and data order): per seed the difference, then its mean,
95% t interval over the seeds (``paired_stats``), the seeds won, and "shown" when the interval excludes 0.
``aggregate`` is a pure function of run directories.

Issue 13's grids (``--grid``, ``GRIDS``): ``sweep`` (R_sp + R_cp at 1x, 3x, 10x, 30x the paper's
coefficients), ``seeds5`` (lb, the paper's and the best coefficient on 5 seeds), ``ablation`` (R_sp only,
R_cp only at a coefficient), ``baseline`` (L_o + L_v at 10x their coefficients), ``budget`` (issue 12:
R_sp exact against ``sp_max_tokens`` = 1/4 and 1/16 of the micro-batch tokens) and ``all``. They share one
``--out`` (a run is keyed by arch, variant and seed, so the grids reuse each other's runs), run 1000 steps
and write their summary to ``docs/results/<grid>.{md,json}`` after every finished run (the plot at the
end). ``--plan`` lists the runs, which are complete, and the estimated time. Variants beyond
configs/variants/ are named by ``VARIANT_RE`` (e.g. ``lb_sp_cp_x30``, ``lb_sp_x10_sub16``): lb.yaml plus
the coefficients on the command line.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_moe_spec.paired_stats import paired_summary
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
#: The corpus of the full benchmark: 3 domains x 400 kB, 512-token BPE (scripts/demo.sh's), with 4% of
#: every domain's bytes in valid and in test: 7,528 tokens per domain in each (docs/data.md).
DATA_ARGS = ("--vocab-size", "512", "--max-bytes-per-domain", "400000", "--split", "92,4,4")
#: Its own folder: data/demo (scripts/demo.sh) is built with the default split.
DEFAULT_DATA = os.path.join("data", "bench_quality")
QUICK_DATA_ARGS = ("--tiny",)
DEFAULT_ITERS = 300
#: Evaluation of the full benchmark: every EVAL_INTERVAL steps and at the last, on the first EVAL_ITERS
#: global batches of the valid split (16 x 8 x 128 = 16,384 tokens of its 22,584); the last also on as
#: many of the test split.
EVAL_INTERVAL = 100
EVAL_ITERS = 16
QUICK_ITERS = 10


# ------------------------------------------------------------------------------------------ variants
#: The paper's coefficients (2602.14159: lambda_sp, lambda_cp) and 2505.22323's as configs/variants/lb_o_v.yaml
#: has them (lambda_o, lambda_v).
PAPER = {"sp_coeff": 2e-3, "cp_coeff": 1e-3, "ortho_coeff": 2e-3, "var_coeff": 1e-3}
TERMS = {"sp": ("sp_coeff",), "cp": ("cp_coeff",), "o_v": ("ortho_coeff", "var_coeff")}
#: Variants beyond configs/variants/: lb + terms (in this order) at ``mult`` times their PAPER
#: coefficients, optionally R_sp/L_o on 1/``sub`` of each micro-batch's tokens (``sp_max_tokens``).
VARIANT_RE = re.compile(r"^lb(?P<terms>(?:_(?:sp|cp|o_v))+)_x(?P<mult>\d+(?:\.\d+)?)(?:_sub(?P<sub>\d+))?$")


def _fmt_mult(mult: float) -> str:
    return str(int(mult)) if float(mult).is_integer() else repr(float(mult))


def variant_name(terms: Sequence[str], mult: float = 1, sub: Optional[int] = None) -> str:
    """``lb_<terms>_x<mult>[_sub<sub>]``; at the paper's coefficients without a budget the name of the
    variant's YAML (``lb_sp_cp``, ``lb_sp``, ``lb_cp``, ``lb_o_v``)."""
    terms = [t for t in TERMS if t in terms]
    name = "lb_" + "_".join(terms)
    if mult != 1 or sub:
        name += f"_x{_fmt_mult(mult)}"
    return name + (f"_sub{int(sub)}" if sub else "")


def parse_variant(name: str) -> Optional[dict]:
    """``{"terms", "mult", "sub", "coeffs"}`` of a VARIANT_RE name (terms in TERMS order, each once);
    None for any other name. ``coeffs``: the four specialization coefficients."""
    m = VARIANT_RE.match(name)
    if not m:
        return None
    terms = re.findall(r"_(sp|cp|o_v)", m.group("terms"))
    if terms != [t for t in TERMS if t in terms]:
        return None
    mult = float(m.group("mult"))
    coeffs = dict.fromkeys(PAPER, 0.0)
    for t in terms:
        for key in TERMS[t]:
            coeffs[key] = PAPER[key] * mult
    sub = int(m.group("sub")) if m.group("sub") else None
    if sub is not None and (sub < 1 or not {"sp", "o_v"} & set(terms)):
        return None
    return {"terms": terms, "mult": mult, "sub": sub, "coeffs": coeffs}


def variant_yaml(variant: str) -> str:
    return os.path.join(ROOT, "configs", "variants", f"{variant}.yaml")


def check_variant(variant: str) -> str:
    """``variant`` when it names a YAML of configs/variants/ or VARIANT_RE; else ValueError naming both."""
    if os.path.isfile(variant_yaml(variant)) or parse_variant(variant):
        return variant
    raise ValueError(f"unknown variant {variant!r}: no configs/variants/{variant}.yaml, and not of the form "
                     "lb_<sp|cp|o_v, in this order>_x<multiple>[_sub<n>] (e.g. lb_sp_cp_x30, lb_sp_x10_sub16)")


def variant_coefficients(variant: str) -> Tuple[Dict[str, float], Optional[int]]:
    """(the four specialization coefficients, the token budget divisor or None) of a variant."""
    if os.path.isfile(variant_yaml(variant)):
        import yaml

        with open(variant_yaml(variant)) as f:
            spec = (yaml.safe_load(f) or {}).get("specialization") or {}
        return {k: float(spec.get(k) or 0.0) for k in PAPER}, None
    parsed = parse_variant(check_variant(variant))
    return parsed["coeffs"], parsed["sub"]


def multiplier(variant: str) -> Optional[float]:
    """The variant's coefficients over the paper's (the first non-zero of sp, cp, o, v); None for lb."""
    coeffs, _ = variant_coefficients(variant)
    for key in PAPER:
        if coeffs[key]:
            return coeffs[key] / PAPER[key]
    return None


def micro_batch_tokens(arch: str) -> int:
    """micro_batch_size x seq_length of configs/<arch>.yaml (the tokens of one micro-batch of a rank)."""
    from megatron_moe_spec.run_config import load_run_config

    cfg = load_run_config([os.path.join(ROOT, "configs", f"{arch}.yaml")], check_paths=False)
    return cfg.training.micro_batch_size * cfg.model.seq_length


def variant_args(arch: str, variant: str) -> Tuple[List[str], List[str]]:
    """(config files after the arch's, --set overrides) of a variant: its YAML, or lb.yaml plus the
    coefficients (and ``sp_max_tokens`` = micro-batch tokens / sub) of a VARIANT_RE name."""
    if os.path.isfile(variant_yaml(variant)):
        return [variant_yaml(variant)], []
    parsed = parse_variant(check_variant(variant))
    sets = [f"specialization.{k}={v!r}" for k, v in parsed["coeffs"].items()]
    if parsed["sub"]:
        sets.append(f"specialization.sp_max_tokens={max(1, micro_batch_tokens(arch) // parsed['sub'])}")
    return [variant_yaml(BASELINE)], sets


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


def run_ep(path: str) -> Optional[int]:
    """The expert-parallel size the run in ``path`` trained with (its config.yaml's ``parallel.ep``), or
    None without a readable config.yaml."""
    try:
        import yaml
        with open(os.path.join(path, "config.yaml")) as f:
            return int((yaml.safe_load(f).get("parallel") or {}).get("ep") or 1)
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def is_complete(path: str, iters: int, nproc: Optional[int] = None) -> bool:
    """The run's metrics.jsonl reaches step ``iters`` (the final record, with its validation loss) and,
    with ``nproc``, it trained with that many processes (expert parallel ``nproc``): a run of another
    layout has other initial expert weights, so it cannot be paired with this grid's lb run."""
    step = last_step(path)
    if step is None or step < iters:
        return False
    return nproc is None or run_ep(path) == nproc


def data_overrides(data_dir: str) -> List[str]:
    return ["data.type=indexed", f"data.paths=[{data_dir}/indexed/corpus]",
            f"data.tokenizer_path={data_dir}/tokenizer"]


def train_command(arch: str, variant: str, seed: int, iters: int, nproc: int, data_dir: str, rdir: str,
                  python: str = sys.executable, master_port: Optional[int] = None) -> List[str]:
    """The argv of one run: ``megatron-moe-spec train`` (under torchrun when ``nproc`` > 1, then with
    expert parallelism ``nproc`` and the all-to-all dispatcher, as scripts/demo.sh)."""
    extra_configs, variant_sets = variant_args(arch, variant)
    configs = [os.path.join(ROOT, "configs", f"{arch}.yaml"), *extra_configs]
    sets = variant_sets + data_overrides(data_dir) + [
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


def plan(out: str, archs, variants, seeds: int, iters: int, runs=None, nproc: Optional[int] = None):
    """[(arch, variant, seed, run_dir, done)] of the grid (or of ``runs``, [(arch, variant, seed)]),
    ``done`` = skipped (already complete, with ``nproc`` processes when given)."""
    runs = grid(archs, variants, seeds) if runs is None else runs
    return [(a, v, s, run_dir(out, a, v, s), is_complete(run_dir(out, a, v, s), iters, nproc)) for a, v, s in runs]


# ------------------------------------------------------------------------------------------ issue 13's grids
GRID_ITERS = 1000
SWEEP_MULTS = (1, 3, 10, 30)
GRIDS = ("sweep", "seeds5", "ablation", "baseline", "budget")
GRID_SEEDS = {"sweep": 3, "seeds5": 5, "ablation": 3, "baseline": 3, "budget": 3}
GRID_HELP = {
    "sweep": "lb and R_sp + R_cp at 1x, 3x, 10x, 30x the paper's (2e-3, 1e-3); 3 seeds",
    "seeds5": "lb, the paper's coefficients and the best coefficient (per arch); 5 seeds",
    "ablation": "lb, R_sp only, R_cp only and both at --coef; 3 seeds",
    "baseline": "lb, L_o + L_v at 10x their coefficients (2e-2, 1e-2), R_sp + R_cp at 10x; 3 seeds",
    "budget": "lb, R_sp at --coef exact and with sp_max_tokens = 1/4 and 1/16 of the micro-batch tokens "
              "(issue 12); 3 seeds",
}
#: Minutes of one 1000-step run on this 2-core machine, measured (--run-minutes to change): with 2 processes
#: alone on the cores, 253 s and 286 s (the first two sweep runs, commits 76b64af / 7a61794, since retrained
#: with 1 process); with 1 process, two runs at
#: once (--grid's default) take 0.29-0.31 s a step each, against 0.23 s for one 2-process run; the sweep's
#: runs, two at a time on otherwise idle cores, took 372-433 s each (runs/grid log, 2026-12-03).
RUN_MINUTES = (4.2, 5.0)
RUN_MINUTES_1PROC = (6.2, 7.2)
#: The fallback coefficient multiple of --plan when --coef best is not known yet (the sweep unfinished).
PLAN_COEF = 10.0


def grid_variants(name: str, coef: Optional[float]) -> List[str]:
    """The variants of one arch in grid ``name``; ``coef``: the multiple of the ablation, budget and
    seeds5 grids (the arch's best coefficient)."""
    sp_cp = ("sp", "cp")
    if name == "sweep":
        return [BASELINE] + [variant_name(sp_cp, m) for m in SWEEP_MULTS]
    if name == "baseline":
        return [BASELINE, variant_name(("o_v",), 10), variant_name(sp_cp, 10)]
    if coef is None:
        raise ValueError(f"grid {name!r} needs a coefficient (--coef)")
    if name == "seeds5":
        return list(dict.fromkeys([BASELINE, variant_name(sp_cp, 1), variant_name(sp_cp, coef)]))
    if name == "ablation":
        return [BASELINE, variant_name(("sp",), coef), variant_name(("cp",), coef), variant_name(sp_cp, coef)]
    if name == "budget":
        return [BASELINE] + [variant_name(("sp",), coef, sub) for sub in (None, 4, 16)]
    raise ValueError(f"unknown grid {name!r}; known: {', '.join(GRIDS)}, all")


def grid_runs(name: str, archs: Sequence[str], coef: Dict[str, Optional[float]], seeds: Optional[int] = None,
              variants: Optional[Sequence[str]] = None) -> List[Tuple[str, str, int]]:
    """[(arch, variant, seed)] of grid ``name``, seed-major (``grid``'s order); ``coef``: per arch;
    ``seeds`` caps the grid's seeds, ``variants`` keeps only those (both for smoke runs)."""
    n = GRID_SEEDS[name] if seeds is None else min(seeds, GRID_SEEDS[name])
    out = []
    for i in range(n):
        for a in archs:
            for v in grid_variants(name, coef.get(a)):
                if variants is None or v in variants:
                    out.append((a, v, BASE_SEED + i))
    return out


def expand_grid(name: str) -> List[str]:
    return list(GRIDS) if name == "all" else [name]


def sweep_rows(rows: List[dict]) -> List[dict]:
    """The rows of R_sp + R_cp at some multiple of the paper's coefficients, without a token budget."""
    out = []
    for r in rows:
        coeffs, sub = variant_coefficients(r["variant"])
        if sub is None and coeffs["sp_coeff"] and coeffs["cp_coeff"] and not coeffs["ortho_coeff"] \
                and not coeffs["var_coeff"]:
            out.append(r)
    return out


def best_coefficients(rows: List[dict]) -> Dict[str, Optional[float]]:
    """Per arch, the multiple of the sweep variant with the lowest mean paired val ppl difference
    against lb (None where no sweep row has one)."""
    best: Dict[str, Tuple[float, float]] = {}
    for r in sweep_rows(rows):
        d = (r.get("paired") or {}).get(PPL) or {}
        if d.get("mean") is None:
            continue
        if r["arch"] not in best or d["mean"] < best[r["arch"]][0]:
            best[r["arch"]] = (d["mean"], multiplier(r["variant"]))
    return {a: m for a, (_, m) in best.items()}


def resolve_coef(coef: str, out: str, archs: Sequence[str], iters: int, for_plan: bool = False,
                 nproc: Optional[int] = None) -> Tuple[Dict[str, Optional[float]], str]:
    """(per-arch multiple, how it was chosen) from --coef: a number, or ``best`` = the sweep's best in
    ``out`` (``best_coefficients`` of its complete runs). Unknown ``best``: PLAN_COEF for --plan, else
    ValueError naming the fix."""
    if coef != "best":
        return {a: float(coef) for a in archs}, f"--coef {coef}"
    rows = aggregate(collect(out, archs, None, 0, iters, runs=grid_runs("sweep", archs, {}), nproc=nproc))
    best = best_coefficients(rows)
    missing = [a for a in archs if best.get(a) is None]
    if missing and for_plan:
        for a in missing:
            best[a] = PLAN_COEF
        return best, (f"the sweep's best ({', '.join(missing)}: no complete sweep yet, planned with "
                      f"x{_fmt_mult(PLAN_COEF)})")
    if missing:
        raise ValueError(f"--coef best: the sweep has no complete lb/variant pair for {', '.join(missing)} in "
                         f"{out}; run --grid sweep first, or pass a multiple, e.g. --coef 10")
    return best, "the sweep's best"


def estimate_minutes(todo: int, iters: int, minutes: Tuple[float, float] = RUN_MINUTES, jobs: int = 1
                     ) -> Tuple[float, float]:
    """(low, high) minutes of training for ``todo`` runs of ``iters`` steps (``minutes`` per 1000-step run),
    ``jobs`` at a time."""
    waves = math.ceil(todo / max(1, jobs))
    return tuple(waves * m * iters / 1000.0 for m in minutes)  # type: ignore[return-value]


def _hm(minutes: float) -> str:
    h, m = divmod(int(round(minutes)), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


def format_plan(sections: List[Tuple[str, list]], iters: int, nproc: int,
                minutes: Tuple[float, float] = RUN_MINUTES, jobs: int = 1) -> str:
    """The --plan text: per grid its runs (complete or to train), then the totals over the distinct runs
    and the estimated training time."""
    lines, seen = [], {}
    for name, entries in sections:
        todo = sum(not done for *_, done in entries)
        lines.append(f"grid {name}: {len(entries)} runs of {iters} steps ({nproc} process(es) each), "
                     f"{len(entries) - todo} complete, {todo} to train")
        for arch, variant, seed, rdir, done in entries:
            new = rdir not in seen
            seen[rdir] = done
            state = "complete" if done else ("to train" if new else "to train (listed above)")
            lines.append(f"  {arch:<14} {variant:<20} seed {seed}  {state:<24} {_shown(rdir)}")
    todo = sum(not done for done in seen.values())
    lo, hi = estimate_minutes(todo, iters, minutes, jobs)
    lines.append(f"total: {len(seen)} distinct runs, {len(seen) - todo} complete, {todo} to train; estimated "
                 f"training time {_hm(lo)} - {_hm(hi)} ({minutes[0]:g}-{minutes[1]:g} min per 1000-step run, "
                 f"{jobs} at a time, measured on 2 idle cores; --run-minutes to change)")
    return "\n".join(lines)


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
             keep_checkpoints: bool = False, python: str = sys.executable, log=print, runs=None,
             on_done=None, jobs: int = 1) -> List[str]:
    """Train every unfinished run of the grid (or of ``runs``), in order, ``jobs`` at a time; returns the
    run directories that failed. ``on_done()`` is called after each run that completes (e.g. to rewrite
    the summary; never two at once)."""
    failed: List[str] = []
    todo = plan(out, archs, variants, seeds, iters, runs, nproc)
    lock = threading.Lock()

    def train(n, arch, variant, seed, rdir):
        tag = f"[{n}/{len(todo)}] {arch} {variant} seed {seed}"
        if os.path.exists(rdir):  # unfinished, interrupted, failed or of another layout: start over
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
        with lock:
            if rc != 0 or not is_complete(rdir, iters, nproc):
                failed.append(rdir)
                log(f"{tag}: FAILED (exit {rc}) after {took:.0f}s; see {log_path}")
                return
            if not keep_checkpoints:
                shutil.rmtree(os.path.join(rdir, "checkpoints"), ignore_errors=True)
            log(f"{tag}: done in {took:.0f}s")
            if on_done is not None:
                on_done()

    pending = []
    for n, (arch, variant, seed, rdir, done) in enumerate(todo, 1):
        if done:
            log(f"[{n}/{len(todo)}] {arch} {variant} seed {seed}: complete ({rdir}), skipped")
        else:
            pending.append((n, arch, variant, seed, rdir))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(train, *p) for p in pending]:  # in order: seed-major, as the plan
            future.result()
    order = {p[4]: i for i, p in enumerate(pending)}
    failed.sort(key=order.__getitem__)
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


TEST_PPL = "test_ppl"


def domain_names(records: List[dict]) -> List[str]:
    """The domains of a run's per-domain validation losses (``val_lm_loss/<domain>``), in logged order."""
    names: Dict[str, None] = {}
    for rec in records:
        for key in rec:
            if key.startswith("val_lm_loss/"):
                names.setdefault(key.split("/", 1)[1])
    return list(names)


def ppl_key(domain: Optional[str] = None, split: str = "val") -> str:
    base = PPL if split == "val" else TEST_PPL
    return base if domain is None else f"{base}/{domain}"


def run_values(records: List[dict]) -> Dict[str, Optional[float]]:
    """One run's table entries: ``val_ppl`` = exp(last val_lm_loss) (the mean over domains of each
    domain's loss, or the token mean in runs without domains), ``val_ppl/<domain>`` = exp(last
    val_lm_loss/<domain>), ``test_ppl`` (``/<domain>``) likewise of the final test evaluation, then each
    of METRICS averaged over the last TAIL_FRACTION of the run (``tail_mean``)."""
    def ppl(key):
        value = _last(records, key)
        return math.exp(value) if value is not None else None

    out = {PPL: ppl("val_lm_loss")}
    for d in domain_names(records):
        out[ppl_key(d)] = ppl(f"val_lm_loss/{d}")
    out[TEST_PPL] = ppl("test_lm_loss")
    for d in domain_names(records):
        out[ppl_key(d, "test")] = ppl(f"test_lm_loss/{d}")
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


def is_ppl(key: str) -> bool:
    return key.split("/", 1)[0] in (PPL, TEST_PPL)


def seed_differences(rows: List[dict], row: dict, key: str) -> List[float]:
    """Per seed (run name) the row's ``key`` minus the BASELINE row's of the same arch and seed; for
    perplexities (``val_ppl``, ``test_ppl``, per domain too) the relative difference in %. Empty without
    a baseline (``baseline_row``)."""
    base = baseline_row(rows, row)
    if base is None:
        return []
    diff = (lambda v, b: 100.0 * (v / b - 1.0)) if is_ppl(key) else (lambda v, b: v - b)
    return [diff(v[key], base["per_run"][s][key]) for s, v in row["per_run"].items()
            if s in base["per_run"] and v.get(key) is not None and base["per_run"][s].get(key) is not None]


def value_keys(per_run: Dict[str, dict]) -> List[str]:
    """The keys of the runs' values, in the order of ``run_values`` (the union over the runs)."""
    keys: Dict[str, None] = {}
    for values in per_run.values():
        for key in values:
            keys.setdefault(key)
    return list(keys)


def aggregate(groups: Dict[Tuple[str, str], Sequence[str]]) -> List[dict]:
    """Pure: ``{(arch, variant): [run_dir, ...]}`` -> one row per group, in the given order:
    ``{"arch", "variant", "seeds", "runs", "per_run": {run name: run_values}, "domains": [...],
    PPL: {"mean", "std", "n"}, <every other value key>: {...}, DELTA: {...}, "wins": (k, n),
    "paired": {key: paired_differences}, "balance_gives": bool or None}``.
    ``paired``: for every value key (perplexities in %, per domain and test too, and the metrics) the
    per-seed difference against the BASELINE variant of the same arch (run directories with the same
    name), summarized by ``paired_differences`` (mean, std, 95% t interval, seeds below/above, shown);
    None for the baseline itself and without one. ``DELTA`` = ``paired[PPL]`` and ``wins`` = (seeds
    with a lower val ppl than lb, seeds paired): both None without a paired seed.
    ``balance_gives``: the mean MaxVio over the row's seeds is above BALANCE_GIVES x lb's (None without
    a baseline or MaxVio)."""
    rows = []
    for (arch, variant), dirs in groups.items():
        per_run = {os.path.basename(os.path.normpath(d)): run_values(read_metrics(d)) for d in dirs}
        keys = value_keys(per_run)
        row = {"arch": arch, "variant": variant, "seeds": len(dirs), "runs": list(dirs), "per_run": per_run,
               "domains": [k.split("/", 1)[1] for k in keys if k.startswith(PPL + "/")]}
        for key in keys:
            row[key] = mean_std(r.get(key) for r in per_run.values())
        rows.append(row)
    for row in rows:  # the paired comparisons, once every row (the baseline's too) has its per-run values
        base = baseline_row(rows, row)
        row["paired"] = {key: paired_differences(seed_differences(rows, row, key))
                         for key in value_keys(row["per_run"]) if key != "tokens_per_sec"} if base else None
        ds = seed_differences(rows, row, PPL)
        row[DELTA] = row["paired"][PPL] if ds else None
        row["wins"] = (sum(d < 0 for d in ds), len(ds)) if ds else None
        mv, mv_base = (row.get("max_vio") or {}).get("mean"), ((base or {}).get("max_vio") or {}).get("mean")
        row["balance_gives"] = None if mv is None or mv_base is None else bool(mv > BALANCE_GIVES * mv_base)
    return rows


#: "Balance gives" where a variant's mean MaxVio exceeds this multiple of lb's (issue 13).
BALANCE_GIVES = 1.2


def paired_differences(ds: List[float]) -> dict:
    """``paired_stats.paired_summary`` of per-seed differences (mean, std, n, ci_low, ci_high, below,
    above, shown: the 95% t interval excludes 0), and ``agree``: two or more seeds, all of one (nonzero)
    sign."""
    out = paired_summary(ds)
    out["agree"] = len(ds) > 1 and (all(d > 0 for d in ds) or all(d < 0 for d in ds))
    return out


def collect(out: str, archs, variants, seeds: int, iters: int, runs=None, nproc: Optional[int] = None
            ) -> Dict[Tuple[str, str], List[str]]:
    """The complete runs of the grid (or of ``runs``; with ``nproc``, only those of that layout), grouped by
    (arch, variant) (groups without one are left out)."""
    groups: Dict[Tuple[str, str], List[str]] = {}
    for arch, variant, _, rdir, done in plan(out, archs, variants, seeds, iters, runs, nproc):
        if done:
            groups.setdefault((arch, variant), []).append(rdir)
    return groups


COLUMNS = ((PPL, "val ppl", ".2f"), ("routing_entropy", "routing entropy", ".3f"),
           ("topk_mass", "top-k mass", ".3f"), ("load_cv", "load CV", ".3f"), ("max_vio", "MaxVio", ".3f"),
           ("activation_similarity", "act. similarity", ".3f"), ("pathway_nmi", "pathway NMI", ".3f"),
           ("domain_mi", "domain MI", ".3f"), ("tokens_per_sec", "tokens/s", ",.0f"))


#: The metric table: each routing metric's paired difference against lb, (key, label, format).
PAIRED = (("routing_entropy", "routing entropy", "+.4f"), ("topk_mass", "top-k mass", "+.4f"),
          ("activation_similarity", "act. similarity", "+.4f"), ("pathway_nmi", "pathway NMI", "+.4f"),
          ("domain_mi", "domain MI", "+.4f"), ("load_cv", "load CV", "+.4f"), ("max_vio", "MaxVio", "+.4f"))
SHOWN = "✓"


def _cell(stat: Dict[str, Optional[float]], fmt: str) -> str:
    if not stat or stat["mean"] is None:
        return "–"
    text = format(stat["mean"], fmt)
    return text if stat["std"] is None else f"{text} ± {format(stat['std'], fmt)}"


def _ci_cell(stat: Optional[dict], fmt: str, unit: str = "", won: bool = False) -> str:
    """``mean [low, high]`` (the 95% t interval; no interval with one seed), ``(k/n)`` = seeds below 0
    when ``won``, and SHOWN when the interval excludes 0; – without a value."""
    if not stat or stat.get("mean") is None:
        return "–"
    text = format(stat["mean"], fmt) + unit
    if stat.get("ci_low") is not None:
        text += f" [{format(stat['ci_low'], fmt)}, {format(stat['ci_high'], fmt)}]"
    if won:
        text += f" ({stat['below']}/{stat['n']})"
    return text + (f" {SHOWN}" if stat.get("shown") else "")


def _delta_cell(row: dict) -> str:
    return _ci_cell(row.get(DELTA), "+.2f", "%", won=True)


def _domains(rows: List[dict]) -> List[str]:
    names: Dict[str, None] = {}
    for row in rows:
        for d in row.get("domains") or []:
            names.setdefault(d)
    return list(names)


def markdown_table(rows: List[dict], title: Optional[str] = None) -> str:
    """The rows as markdown: the levels (mean ± std over seeds; no ± with one seed, – when never logged),
    then the paired differences against lb with 95% t intervals: perplexities (validation, per domain,
    test) and the routing metrics."""
    domains = _domains(rows)
    has_test = any(r.get(TEST_PPL, {}).get("mean") is not None for r in rows)
    header = ["arch", "variant", "seeds", "val ppl", f"Δ val ppl vs {BASELINE} [95% CI] (won)"]
    header += [f"val ppl {d}" for d in domains] + (["test ppl"] if has_test else [])
    header += [label for _, label, _ in COLUMNS[1:]]
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for row in rows:
        cells = [row["arch"], row["variant"], str(row["seeds"]), _cell(row.get(PPL), ".2f"), _delta_cell(row)]
        cells += [_cell(row.get(ppl_key(d)), ".2f") for d in domains]
        cells += [_cell(row.get(TEST_PPL), ".2f")] if has_test else []
        cells += [_cell(row.get(key), fmt) for key, _, fmt in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample std (ddof 1) over seeds. val ppl = exp(last val_lm_loss) on the fixed validation "
              "set: the mean over domains of each domain's loss (every domain weighs the same); val ppl <domain> "
              "= exp(last val_lm_loss/<domain>); test ppl: the final evaluation on the test split. Δ val ppl vs lb: "
              "per seed 100 * (ppl / ppl of lb with the same seed - 1), in %, then the mean and its 95% t "
              f"interval over the seeds; (k/n): the seeds where the variant is below lb; {SHOWN} = shown: the "
              "interval excludes 0. The routing metrics are means over MoE layers (docs/design.md), averaged "
              f"over the last {TAIL_FRACTION:.0%} of each run's steps."]
    paired = [row for row in rows if row.get("paired")]
    if paired:
        keys = [(PPL, "val")] + [(ppl_key(d), f"val {d}") for d in domains]
        keys += [(TEST_PPL, "test")] + [(ppl_key(d, "test"), f"test {d}") for d in domains] if has_test else []
        header = ["arch", "variant", "seeds"] + [label for _, label in keys] + ["balance gives"]
        lines += ["", f"### Perplexity against {BASELINE} (same arch, same seed): Δ %, mean [95% CI] (won)", "",
                  "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
        for row in paired:
            cells = [row["arch"], row["variant"], str(row["paired"].get(PPL, {}).get("n", 0))]
            cells += [_ci_cell(row["paired"].get(key), "+.2f", "%", won=True) for key, _ in keys]
            cells.append({True: f"yes (MaxVio > {BALANCE_GIVES:g} x lb)", False: "no", None: "–"}[row.get("balance_gives")])
            lines.append("| " + " | ".join(cells) + " |")
        header = ["arch", "variant", "seeds"] + [label for _, label, _ in PAIRED]
        lines += ["", f"### Routing metrics against {BASELINE} (same arch, same seed): difference, mean [95% CI]", "",
                  "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(PAIRED)) + "|"]
        for row in paired:
            cells = [row["arch"], row["variant"], str(row["paired"][PAIRED[0][0]]["n"])]
            cells += [_ci_cell(row["paired"][key], fmt) for key, _, fmt in PAIRED]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Per seed: the variant's value minus {BASELINE}'s with the same seed (the same initial "
                  "weights and data order), then the mean and its 95% t interval over the seeds "
                  f"(megatron_moe_spec/paired_stats.py); {SHOWN} = the interval excludes 0. Balance gives: the "
                  f"variant's mean MaxVio is above {BALANCE_GIVES:g} x lb's."]
    return "\n".join(lines) + "\n"


def write_table(rows: List[dict], path: str, title: Optional[str] = None, meta: Optional[dict] = None) -> str:
    """Write ``path`` (markdown) and ``path`` with .json (the rows and ``meta``) atomically; returns the
    markdown."""
    text = markdown_table(rows, title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for target, write in ((path, lambda f: f.write(text)),
                          (os.path.splitext(path)[0] + ".json",
                           lambda f: (json.dump({"meta": meta or {}, "rows": rows}, f, indent=1), f.write("\n")))):
        with open(target + ".tmp", "w") as f:
            write(f)
        os.replace(target + ".tmp", target)
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


#: The panels of the sweep plot against the coefficient, (key, title): paired differences against lb.
SWEEP_PANELS = ((PPL, "val ppl (%)  [lower: better]"),
                ("activation_similarity", "activation similarity  [R_sp lowers]"),
                ("routing_entropy", "routing entropy  [lower: sharper]"),
                ("topk_mass", "top-k mass"),
                ("pathway_nmi", "pathway NMI  [R_cp raises]"),
                ("domain_mi", "domain MI (nats)"),
                ("load_cv", "load CV"),
                ("max_vio", f"MaxVio  [dashed: {BALANCE_GIVES:g} x lb]"))


def plot_sweep(rows: List[dict], path: str) -> None:
    """Val ppl and the routing metrics against the coefficient (multiple of the paper's, log axis): per arch
    a row of SWEEP_PANELS, each the paired difference against lb (dots: seeds; line: mean; bars: 95% t
    interval). On the MaxVio panel the dashed line is (BALANCE_GIVES - 1) x lb's mean MaxVio: above it the
    mean MaxVio is over BALANCE_GIVES x lb's ("balance gives"). Needs matplotlib (the ``report`` extra)."""
    from megatron_moe_spec.report.plots import new_figure, save  # matplotlib: imported only here
    family = sweep_rows(rows)
    archs = list(dict.fromkeys(r["arch"] for r in family))
    fig = new_figure(4.0 * len(SWEEP_PANELS) / 2, 6.4 * max(1, len(archs)))
    axes = fig.subplots(2 * max(1, len(archs)), len(SWEEP_PANELS) // 2, squeeze=False)
    for a, arch in enumerate(archs):
        cells = sorted((multiplier(r["variant"]), r) for r in family if r["arch"] == arch)
        base = next((r for r in rows if r["arch"] == arch and r["variant"] == BASELINE), None)
        for ax, (key, title) in zip(axes[2 * a:2 * a + 2].ravel(), SWEEP_PANELS):
            xs, means, lows, highs = [], [], [], []
            for mult, row in cells:
                ds = seed_differences(rows, row, key)
                if not ds:
                    continue
                stat = paired_differences(ds)
                ax.plot([mult] * len(ds), ds, "o", ms=3.5, color="tab:blue", alpha=0.6)
                xs.append(mult)
                means.append(stat["mean"])
                lows.append(stat["ci_low"] if stat["ci_low"] is not None else stat["mean"])
                highs.append(stat["ci_high"] if stat["ci_high"] is not None else stat["mean"])
            if xs:
                ax.errorbar(xs, means, yerr=[[m - lo for m, lo in zip(means, lows)],
                                             [hi - m for m, hi in zip(means, highs)]],
                            color="tab:blue", marker="s", ms=5, capsize=3)
            if key == "max_vio" and base is not None and (base.get("max_vio") or {}).get("mean") is not None:
                ax.axhline((BALANCE_GIVES - 1.0) * base["max_vio"]["mean"], color="tab:red", ls="--", lw=1)
            ax.axhline(0.0, color="0.3", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlim(0.7, 45)
            ax.minorticks_off()
            ax.set_xticks(list(SWEEP_MULTS), [f"{_fmt_mult(m)}x" for m in SWEEP_MULTS])
            ax.set_title(f"{arch}: {title}", fontsize=9)
            ax.grid(alpha=0.3)
    fig.suptitle(f"R_sp + R_cp at k x the paper's coefficients: difference against {BASELINE} with the same seed "
                 "(dots: seeds, squares: mean, bars: 95% t interval)", fontsize=11)
    save(fig, path)


def findings(rows: List[dict]) -> dict:
    """What the grid says in numbers: per arch the best sweep coefficient (lowest mean paired Δ val ppl)
    with its interval, and the smallest multiple where balance gives (None: nowhere)."""
    out: dict = {"best_coefficient": best_coefficients(rows), "balance_gives_from": {}}
    for r in sweep_rows(rows):
        if r.get("balance_gives"):
            m = multiplier(r["variant"])
            prev = out["balance_gives_from"].get(r["arch"])
            out["balance_gives_from"][r["arch"]] = m if prev is None else min(prev, m)
    return out


# ------------------------------------------------------------------------------------------ main
def _variant_arg(value: str) -> str:
    try:
        return check_variant(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=GRIDS + ("all",), default=None,
                   help="one of issue 13's grids (" + "; ".join(f"{k}: {v}" for k, v in GRID_HELP.items()) +
                        f"; all: every one, in this order), {GRID_ITERS} steps; --archs, --variants and --seeds "
                        "then only narrow it (smoke runs)")
    p.add_argument("--coef", default="best",
                   help="the multiple of the paper's coefficients of --grid seeds5, ablation and budget: a number, "
                        "or best (default): per arch the sweep's best, from the complete sweep runs in --out")
    p.add_argument("--plan", action="store_true",
                   help="list the runs (complete or to train) and the estimated training time; run nothing")
    p.add_argument("--run-minutes", nargs=2, type=float, default=None, metavar=("LOW", "HIGH"),
                   help=f"minutes of one 1000-step run for --plan's estimate (default, measured here: "
                        f"{RUN_MINUTES[0]:g} {RUN_MINUTES[1]:g} with 2 processes, {RUN_MINUTES_1PROC[0]:g} "
                        f"{RUN_MINUTES_1PROC[1]:g} with 1 process two at a time; scaled by --iters)")
    p.add_argument("--variants", nargs="+", default=None, type=_variant_arg, metavar="VARIANT",
                   help=f"loss variants (configs/variants/, or lb_<sp|cp|o_v>_x<k>[_sub<n>]; default: "
                        f"{' '.join(VARIANTS)}; also e.g. {' '.join(EXTRA_VARIANTS)}, lb_sp_cp_x30, lb_sp_x10_sub16)")
    p.add_argument("--archs", nargs="+", default=None, choices=ARCHS, metavar="ARCH",
                   help=f"architectures (configs/; default {' '.join(ARCHS)})")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per cell (default 3; seed i = {BASE_SEED}+i)")
    p.add_argument("--iters", type=int, default=None,
                   help=f"training steps per run (default {DEFAULT_ITERS}, with --grid {GRID_ITERS})")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per run (expert parallel = nproc; default 2, with --grid 1). A complete run "
                        "of another layout does not count: its initial expert weights differ, so it is retrained")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained at once (default 1; with --grid, CPU cores // nproc: on 2 cores two "
                        "1-process runs at once train the grid about 1.5x faster than one 2-process run)")
    p.add_argument("--out", default=None, help="output root of the run dirs (default runs/bench_quality; with "
                                               "--grid runs/balanced)")
    p.add_argument("--data", default=None, help=f"corpus folder (default {DEFAULT_DATA}, with --quick OUT/data), "
                                               "prepared with the benchmark's settings: built when missing, "
                                               "reused when its manifest matches, rebuilt otherwise")
    p.add_argument("--table", default=None, help="markdown table path (default OUT/table.md; with --grid "
                                                "docs/results/balanced_<grid>.md); the JSON and a PNG plot of it "
                                                "(.json, .png) beside it")
    p.add_argument("--no-plot", action="store_true", help="write no PNG (the plot needs matplotlib)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {' '.join(QUICK_VARIANTS)} on tiny_vanilla, 1 seed, {QUICK_ITERS} steps, "
                        "1 process, the --tiny corpus (explicit options override)")
    p.add_argument("--aggregate-only", action="store_true", help="train nothing: tabulate the complete runs")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    a = p.parse_args(argv)
    q = a.quick
    a.filter_variants = a.variants
    a.variants = a.variants or list(QUICK_VARIANTS if q else VARIANTS)
    a.archs = a.archs or (["tiny_vanilla"] if q else list(ARCHS))
    a.filter_seeds = a.seeds
    a.seeds = a.seeds if a.seeds is not None else (1 if q else 3)
    a.iters = a.iters if a.iters is not None else (QUICK_ITERS if q else GRID_ITERS if a.grid else DEFAULT_ITERS)
    a.nproc = a.nproc if a.nproc is not None else (1 if q or a.grid else 2)
    a.jobs = a.jobs if a.jobs is not None else (max(1, (os.cpu_count() or 1) // a.nproc) if a.grid else 1)
    if a.run_minutes is None:
        a.run_minutes = list(RUN_MINUTES_1PROC if a.nproc == 1 and a.jobs > 1 else RUN_MINUTES)
    a.out = os.path.abspath(a.out or os.path.join("runs", "balanced" if a.grid else "bench_quality"))
    a.data = os.path.abspath(a.data or (os.path.join(a.out, "data") if q else os.path.join(ROOT, DEFAULT_DATA)))
    a.table = a.table or (None if a.grid else os.path.join(a.out, "table.md"))
    if a.seeds < 1 or a.iters < 1 or a.nproc < 1 or a.jobs < 1:
        p.error("--seeds, --iters, --nproc and --jobs must be positive")
    if a.coef != "best":
        try:
            if float(a.coef) <= 0:
                raise ValueError
        except ValueError:
            p.error(f"--coef must be a positive number or best, got {a.coef!r}")
    return a


def _shown(path: str) -> str:
    """``path`` relative to the checkout when it lies inside it, else as given."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith(os.pardir) else rel


def grid_table_path(a, name: str) -> str:
    """Where grid ``name`` writes its summary: --table (its stem + _<grid> when --grid all), else
    docs/results/balanced_<grid>.md."""
    if a.table is None:
        return os.path.join(ROOT, "docs", "results", f"balanced_{name}.md")
    if a.grid == "all":
        stem, ext = os.path.splitext(a.table)
        return f"{stem}_{name}{ext or '.md'}"
    return a.table


def _grid_sections(a, for_plan: bool):
    """[(grid name, runs, how the coefficient was chosen)] of --grid (resolved now: see main_grid)."""
    out = []
    for name in expand_grid(a.grid):
        coef, how = ({}, "") if name in ("sweep", "baseline") else resolve_coef(a.coef, a.out, a.archs, a.iters, for_plan, a.nproc)
        runs = grid_runs(name, a.archs, coef, a.filter_seeds, a.filter_variants)
        out.append((name, runs, how))
    return out


def write_grid_summary(a, name: str, runs, how: str, plot: bool, failed=()) -> List[dict]:
    """Aggregate grid ``name``'s complete runs and write its table and JSON (and, with ``plot``, the PNG)."""
    rows = aggregate(collect(a.out, a.archs, None, 0, a.iters, runs=runs, nproc=a.nproc))
    for row in rows:  # the JSON names the runs relative to the checkout, so it can be committed
        row["runs"] = [_shown(d) for d in row["runs"]]
    complete = sum(len(r["runs"]) for r in rows)
    meta = {"grid": name, "about": GRID_HELP[name], "coefficient": how or None, "archs": a.archs,
            "variants": list(dict.fromkeys(v for _, v, _ in runs)), "seeds": GRID_SEEDS[name] if a.filter_seeds is None
            else min(a.filter_seeds, GRID_SEEDS[name]), "iters": a.iters, "nproc": a.nproc, "data": _shown(a.data),
            "out": _shown(a.out), "quick": a.quick, "runs_planned": len(runs), "runs_complete": complete,
            "failed": [_shown(f) for f in failed], "findings": findings(rows) if rows else {}}
    smoke = " (SMOKE RUN: not results)" if a.quick or a.iters < 100 else ""
    title = f"Balanced-split grid {name}{smoke}: {a.iters} steps, {complete} of {len(runs)} runs complete, " \
            f"{a.nproc} process(es) each"
    path = grid_table_path(a, name)
    text = write_table(rows, path, title, meta)
    if plot and rows and not a.no_plot:
        (plot_sweep if name == "sweep" else plot_quality)(rows, os.path.splitext(path)[0] + ".png")
    return rows


def main_grid(a) -> int:
    """--grid: plan, or train grid by grid (the ``best`` coefficient is resolved after the sweep has run),
    rewriting each grid's summary after every finished run."""
    if a.plan or a.dry_run:
        resolved = _grid_sections(a, True)
        sections = [(name, plan(a.out, None, None, 0, a.iters, runs, a.nproc)) for name, runs, _ in resolved]
        if a.plan:
            for name, _, how in resolved:
                if how:
                    print(f"grid {name}: coefficient = {how}")
            print(format_plan(sections, a.iters, a.nproc, tuple(a.run_minutes), a.jobs))
        else:
            for _, entries in sections:
                for arch, variant, seed, rdir, done in entries:
                    cmd = train_command(arch, variant, seed, a.iters, a.nproc, a.data, rdir, master_port=0)
                    print(("# complete, skipped: " if done else "") + " ".join(cmd))
        return 0
    if not a.aggregate_only:
        prepare_corpus(a.data, a.quick)
    missing, failed_all = 0, []
    for name in expand_grid(a.grid):
        try:  # resolved only now: --coef best reads the sweep that the previous iteration may have run
            runs, how = _grid_runs_now(a, name)
        except ValueError as err:
            print(f"[bench_quality] grid {name}: {err}", file=sys.stderr)
            return 2
        print(f"[bench_quality] grid {name}: {len(runs)} runs" + (f", coefficient: {how}" if how else ""), flush=True)
        failed: List[str] = []
        if not a.aggregate_only:
            failed = run_grid(a.out, None, None, 0, a.iters, a.nproc, a.data, a.keep_checkpoints, runs=runs, jobs=a.jobs,
                              on_done=lambda: write_grid_summary(a, name, runs, how, plot=False))
        rows = write_grid_summary(a, name, runs, how, plot=True, failed=failed)
        path = grid_table_path(a, name)
        print(open(path).read(), end="")
        print(f"wrote {_shown(path)} and its .json" + ("" if a.no_plot or not rows else " and .png"), flush=True)
        missing += len(runs) - sum(len(r["runs"]) for r in rows)
        failed_all += failed
    if failed_all or missing:
        print(f"{missing} run(s) of the grid(s) are not complete" +
              (f"; failed: {', '.join(failed_all)}" if failed_all else ""), file=sys.stderr)
        return 1
    return 0


def _grid_runs_now(a, name: str):
    """(runs, how the coefficient was chosen) of grid ``name``; ValueError when --coef best is unknown."""
    coef, how = ({}, "") if name in ("sweep", "baseline") else resolve_coef(a.coef, a.out, a.archs, a.iters, nproc=a.nproc)
    return grid_runs(name, a.archs, coef, a.filter_seeds, a.filter_variants), how


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.grid:
        return main_grid(a)
    failed: List[str] = []
    if a.plan:
        print(format_plan([("custom", plan(a.out, a.archs, a.variants, a.seeds, a.iters, None, a.nproc))], a.iters,
                          a.nproc, tuple(a.run_minutes), a.jobs))
        return 0
    if a.dry_run:
        for arch, variant, seed, rdir, done in plan(a.out, a.archs, a.variants, a.seeds, a.iters, None, a.nproc):
            cmd = train_command(arch, variant, seed, a.iters, a.nproc, a.data, rdir, master_port=0)
            print(("# complete, skipped: " if done else "") + " ".join(cmd))
        return 0
    start = time.perf_counter()
    if not a.aggregate_only:
        prepare_corpus(a.data, a.quick)
        failed = run_grid(a.out, a.archs, a.variants, a.seeds, a.iters, a.nproc, a.data, a.keep_checkpoints,
                          jobs=a.jobs)
    groups = collect(a.out, a.archs, a.variants, a.seeds, a.iters, nproc=a.nproc)
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
