"""The small amount of arithmetic the plots and the summary table need, kept apart from the drawing
so that it can be tested on numbers (the plots are handed exactly what these functions return).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


def row_normalize(matrix) -> np.ndarray:
    """Divide each row by its sum: counts[E x D] -> P(column | row). Rows whose sum is 0 (an expert
    that received no token) become NaN, so the plot shows them as "no data" instead of as 0."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"row_normalize expects a 2-D matrix, got shape {m.shape}")
    sums = m.sum(axis=1, keepdims=True)
    out = np.full_like(m, np.nan)
    nonzero = sums[:, 0] > 0
    out[nonzero] = m[nonzero] / sums[nonzero]
    return out


def offdiag(matrix) -> np.ndarray:
    """The matrix with its diagonal set to NaN (an expert's similarity with itself carries no
    information; masking it keeps the colour scale for the pairs)."""
    m = np.array(matrix, dtype=float)
    n = min(m.shape)
    m[np.arange(n), np.arange(n)] = np.nan
    return m


def load_cv(counts) -> np.ndarray:
    """CV = std(c)/mean(c) over experts (population std), per column of counts[E x S] (or for one
    vector). NaN where the mean is 0."""
    c = np.asarray(counts, dtype=float)
    mean = np.nanmean(c, axis=0)
    std = np.nanstd(c, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, std / mean, np.nan)


def max_vio(counts) -> np.ndarray:
    """MaxVio = max_e c_e / mean(c) - 1, per column of counts[E x S] (or for one vector)."""
    c = np.asarray(counts, dtype=float)
    mean = np.nanmean(c, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, np.nanmax(c, axis=0) / mean - 1.0, np.nan)


def load_ratio(counts) -> np.ndarray:
    """c_e / mean_e(c) per column of counts[E x S]: 1 = the expert gets exactly its fair share."""
    c = np.asarray(counts, dtype=float)
    mean = np.nanmean(c, axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, c / mean, np.nan)


def moving_average(values, window: int) -> np.ndarray:
    """Centered moving average over ``window`` points (odd), ignoring NaNs; near the ends the window
    shrinks to the points available. Centered, so the smoothed curve does not lag the raw one."""
    v = np.asarray(values, dtype=float)
    half = max(int(window) // 2, 0)
    finite = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, v, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(finite)])
    idx = np.arange(v.size)
    lo = np.clip(idx - half, 0, v.size)
    hi = np.clip(idx + half + 1, 0, v.size)
    count = ccnt[hi] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[hi] - csum[lo]) / np.maximum(count, 1), np.nan)


def smoothing_window(n_points: int) -> Optional[int]:
    """The moving-average window used for a curve of n points: None (no smoothing) below 60 points,
    else an odd window of about n/40 points (at least 5)."""
    if n_points < 60:
        return None
    w = max(5, n_points // 40)
    return w if w % 2 else w + 1


# ---------------------------------------------------------------------- summary table
@dataclass
class SummaryRow:
    key: str
    label: str
    better: str  # "low", "high" or "" (no preferred direction)
    source: Optional[str] = None
    """The metrics.jsonl key the row is computed from, with ``exp`` applied (perplexities); None: ``key``."""


#: The rows of the summary table, in order; a row is shown when at least one run logs it.
SUMMARY_ROWS: Tuple[SummaryRow, ...] = (
    SummaryRow("lm_loss", "LM loss (train)", "low"),
    SummaryRow("val_lm_loss", "LM loss (validation)", "low"),
    SummaryRow("load_balancing_loss", "load-balancing loss", "low"),
    SummaryRow("z_loss", "z-loss", "low"),
    SummaryRow("specialization_loss", "R_sp specialization loss", "low"),
    SummaryRow("coupling_loss", "R_cp coupling loss", "low"),
    SummaryRow("orthogonality_loss", "L_o orthogonality loss", "low"),
    SummaryRow("variance_loss", "L_v variance loss", "low"),
    SummaryRow("routing_entropy", "routing entropy (/log E)", ""),
    SummaryRow("topk_mass", "top-k mass", ""),
    SummaryRow("load_cv", "load CV", "low"),
    SummaryRow("max_vio", "MaxVio", "low"),
    SummaryRow("dead_experts", "dead experts", "low"),
    SummaryRow("token_expert_mi", "token-expert MI (nats)", ""),
    SummaryRow("coactivation", "co-activation", ""),
    SummaryRow("activation_similarity", "expert similarity |cos|", "low"),
    SummaryRow("pathway_nmi", "pathway NMI", ""),
    SummaryRow("domain_mi", "domain MI (nats)", ""),
    SummaryRow("tokens_per_sec", "tokens / s", "high"),
)


@dataclass
class Stat:
    last: float
    last_step: int
    min: float
    min_step: int


def last_and_min(steps: Sequence[float], values: Sequence[float]) -> Optional[Stat]:
    """The last finite value (and its step) and the minimum finite value (and its step); None when
    there is no finite value. A NaN at the very end (a diverged run) is reported as the last value."""
    steps = np.asarray(steps, dtype=float)
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return None
    finite = np.isfinite(values)
    if not finite.any():
        return Stat(float(values[-1]), int(steps[-1]), math.nan, int(steps[-1]))
    i_min = int(np.nanargmin(np.where(finite, values, np.nan)))
    return Stat(float(values[-1]), int(steps[-1]), float(values[i_min]), int(steps[i_min]))


def fmt(value: float) -> str:
    """How the report prints a number: 4 significant digits, plain integers for whole numbers."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if float(value).is_integer() and abs(value) < 1e7:
        return str(int(value))
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}"


def spread_layers(layers: Sequence[int], k: int) -> List[int]:
    """At most k of ``layers``, evenly spread, always including the first and the last."""
    layers = sorted(layers)
    if len(layers) <= k:
        return layers
    idx = sorted({int(round(i * (len(layers) - 1) / (k - 1))) for i in range(k)})
    return [layers[i] for i in idx]


def perplexity_rows(runs) -> List[SummaryRow]:
    """Validation perplexity (the mean over domains of each domain's loss, exponentiated), per domain
    (``val_lm_loss/<domain>``), and the same for the test split, for the keys some run logs."""
    rows = []
    for split, label in (("val", "validation"), ("test", "test")):
        loss = f"{split}_lm_loss"
        domains: Dict[str, None] = {}
        for run in runs:
            for rec in run.metrics:
                for key in rec:
                    if key.startswith(loss + "/"):
                        domains.setdefault(key.split("/", 1)[1])
        rows.append(SummaryRow(f"{split}_ppl", f"perplexity ({label})", "low", source=loss))
        rows += [SummaryRow(f"{split}_ppl/{d}", f"perplexity ({label}, {d})", "low", source=f"{loss}/{d}")
                 for d in domains]
    return rows


def summary(runs) -> List[Tuple[SummaryRow, List[Optional[Stat]]]]:
    """[(row, [Stat or None per run])] for every row that at least one run logs: SUMMARY_ROWS with the
    test loss and the perplexities (``perplexity_rows``) after the validation loss."""
    table = []
    extra = [SummaryRow("test_lm_loss", "LM loss (test, final)", "low")] + perplexity_rows(runs)
    at = [r.key for r in SUMMARY_ROWS].index("val_lm_loss") + 1
    for row in SUMMARY_ROWS[:at] + tuple(extra) + SUMMARY_ROWS[at:]:
        stats = []
        for run in runs:
            key = row.source or row.key
            if not run.has(key):
                stats.append(None)
                continue
            steps, values = run.series(key)
            stats.append(last_and_min(steps, np.exp(values) if row.source else values))
        if any(s is not None for s in stats):
            table.append((row, stats))
    return table
