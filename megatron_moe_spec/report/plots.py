"""The report's figures.

Two kinds of functions:
- ``*_panels`` / ``*_series``: pure data preparation (numpy only), returning exactly what is drawn.
  The tests check these numbers (e.g. the row normalization of the heatmaps).
- ``plot_*``: draw a ``matplotlib.figure.Figure`` from that data. pyplot is never imported, so no
  global backend is selected and nothing here needs a display (images are rendered with Agg).

Every figure has a fixed size in inches (figure size x ``DPI`` = pixel size, no tight bbox), a title,
axis labels with units, and legends or colorbars outside the data area.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import matplotlib

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from . import analysis
from .runs import AUX_LOSSES, Run

DPI = 100
RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 13,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
LABELS = {
    "lm_loss": "LM loss",
    "val_lm_loss": "LM loss (validation)",
    "load_balancing_loss": "load-balancing loss",
    "z_loss": "router z-loss",
    "specialization_loss": "R_sp: intra-layer specialization",
    "coupling_loss": "R_cp: cross-layer coupling",
    "orthogonality_loss": "L_o: orthogonality",
    "variance_loss": "L_v: router variance",
    "routing_entropy": "routing entropy H(p)/log E",
    "topk_mass": "top-k probability mass",
    "load_cv": "load CV (std/mean tokens per expert)",
    "max_vio": "MaxVio (max/mean tokens per expert - 1)",
    "dead_experts": "dead experts (no token)",
    "token_expert_mi": "token-expert mutual information",
    "coactivation": "co-activation (mean Jaccard)",
    "activation_similarity": "expert similarity, mean |cos|",
    "pathway_nmi": "pathway NMI (adjacent MoE layers)",
    "domain_mi": "domain mutual information",
}
UNITS = {
    "lm_loss": "nats / token",
    "routing_entropy": "fraction of log E",
    "topk_mass": "probability",
    "load_cv": "ratio",
    "max_vio": "ratio",
    "dead_experts": "experts",
    "token_expert_mi": "nats",
    "coactivation": "ratio",
    "activation_similarity": "|cos|",
    "pathway_nmi": "0 (independent) .. 1",
    "domain_mi": "nats",
}
#: Mean-over-layer metrics compared across runs in the overview figure (entropy has its own).
OVERVIEW_METRICS = (
    "topk_mass",
    "token_expert_mi",
    "activation_similarity",
    "coactivation",
    "pathway_nmi",
    "domain_mi",
    "load_cv",
    "max_vio",
    "dead_experts",
)


# ---------------------------------------------------------------------- colours
def run_colors(runs: Sequence[Run]) -> Dict[str, tuple]:
    """One colour per run, by position, the same in every figure."""
    cmap = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return {run.name: cmap(i % cmap.N) for i, run in enumerate(runs)}


def layer_colors(layers: Sequence[int]) -> Dict[int, tuple]:
    """One colour per transformer layer index (shallow = dark, deep = bright), the same in every
    run so that "layer 3" looks the same everywhere."""
    layers = sorted(set(layers))
    cmap = matplotlib.colormaps["viridis"]
    if len(layers) == 1:
        return {layers[0]: cmap(0.35)}
    return {l: cmap(0.9 * i / (len(layers) - 1)) for i, l in enumerate(layers)}


def _cmap(name: str, bad: str = "#d0d0d0"):
    return matplotlib.colormaps[name].with_extremes(bad=bad)


# ---------------------------------------------------------------------- data preparation
@dataclass
class Panel:
    """One heatmap: ``matrix`` is exactly what is drawn (rows x columns)."""

    title: str
    matrix: np.ndarray
    row_label: str
    col_label: str
    col_names: Optional[List[str]] = None
    step: Optional[int] = None
    notes: List[str] = field(default_factory=list)


def domain_panels(run: Run, layers: Sequence[int]) -> List[Panel]:
    """P(domain | expert) per layer at the last step that logs ``expert_domain``: the top-1 counts
    [E x D] normalized per expert row (rows of experts without tokens are NaN)."""
    panels = []
    for layer in layers:
        entry = run.matrix("expert_domain", layer)
        if entry is None:
            continue
        step, counts = entry
        p = analysis.row_normalize(counts)
        dead = [int(e) for e in np.flatnonzero(np.isnan(p[:, 0]))]
        panels.append(
            Panel(
                title=f"layer {layer}",
                matrix=p,
                row_label="expert (top-1)",
                col_label="domain",
                col_names=run.domain_names(counts.shape[1]),
                step=step,
                notes=[f"no token: expert {', '.join(map(str, dead))}"] if dead else [],
            )
        )
    return panels


def transition_panels(run: Run, layers: Sequence[int]) -> List[Panel]:
    """P(top-1 at the next MoE layer | top-1 at layer i) at the last step that logs ``transition``:
    counts [E x E'] normalized per row. One panel per layer i in ``layers`` that has a next MoE layer."""
    panels = []
    for layer in layers:
        entry = run.matrix("transition", layer)
        if entry is None:
            continue
        step, counts = entry
        nxt = run.next_moe_layer(layer)
        panels.append(
            Panel(
                title=f"layer {layer} \u2192 {nxt if nxt is not None else 'next'}",
                matrix=analysis.row_normalize(counts),
                row_label=f"top-1 expert at layer {layer}",
                col_label=f"top-1 expert at layer {nxt if nxt is not None else 'next'}",
                step=step,
            )
        )
    return panels


def similarity_panels(run: Run, layers: Sequence[int]) -> List[Panel]:
    """Mean |cos| of co-activated expert pairs [E x E] at the last step that logs ``similarity``,
    diagonal masked (NaN)."""
    panels = []
    for layer in layers:
        entry = run.matrix("similarity", layer)
        if entry is None:
            continue
        step, sim = entry
        panels.append(
            Panel(
                title=f"layer {layer}",
                matrix=analysis.offdiag(sim),
                row_label="expert",
                col_label="expert",
                step=step,
            )
        )
    return panels


def tokens_panels(run: Run, layers: Sequence[int]) -> List[Tuple[int, np.ndarray, np.ndarray]]:
    """[(layer, steps[S], load ratio [E x S])]: tokens per expert / mean tokens per expert."""
    out = []
    for layer in layers:
        steps, counts = run.tokens_matrix(layer)
        if steps.size:
            out.append((layer, steps, analysis.load_ratio(counts)))
    return out


def load_series(run: Run, layer: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(steps, CV, MaxVio, source) for one layer: from metrics.jsonl (``load_cv/layer_i``,
    ``max_vio/layer_i``) when logged, else computed from routing.jsonl ``tokens_per_expert``."""
    s_cv, cv = run.series(f"load_cv/layer_{layer}")
    s_mv, mv = run.series(f"max_vio/layer_{layer}")
    if cv.size and mv.size and np.array_equal(s_cv, s_mv):
        return s_cv, cv, mv, "metrics.jsonl"
    steps, counts = run.tokens_matrix(layer)
    if steps.size:
        return steps, analysis.load_cv(counts), analysis.max_vio(counts), "routing.jsonl"
    return np.zeros(0), np.zeros(0), np.zeros(0), ""


# ---------------------------------------------------------------------- figure helpers
def new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str, fmt: str = "png") -> Tuple[int, int]:
    """Write the figure; returns its pixel size (width, height)."""
    fig.savefig(path, format=fmt, dpi=DPI)
    w, h = fig.get_size_inches()
    return int(round(w * DPI)), int(round(h * DPI))


def _grid(n: int, max_cols: int) -> Tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return int(math.ceil(n / cols)), cols


def _axes_grid(fig: Figure, n: int, max_cols: int, **kw):
    rows, cols = _grid(n, max_cols)
    axes = fig.subplots(rows, cols, squeeze=False, **kw).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return list(axes[:n])


def _plot_curve(ax, x, y, color, linestyle="-", marker=None, label=None, smooth=True):
    """A curve; long noisy curves are drawn raw (faint) plus an EMA (solid)."""
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if not x.size:
        return
    alpha = analysis.smoothing_alpha(len(y)) if smooth else None
    if alpha is None:
        ax.plot(x, y, color=color, linestyle=linestyle, marker=marker, markersize=3.5, lw=1.6, label=label)
    else:
        ax.plot(x, y, color=color, linestyle=linestyle, lw=0.8, alpha=0.3)
        ax.plot(x, analysis.ema(y, alpha), color=color, linestyle=linestyle, lw=1.8, label=label)


def _run_legend(fig: Figure, runs: Sequence[Run], colors, extra: Sequence[Line2D] = ()):
    handles = [Line2D([], [], color=colors[r.name], lw=2.5, label=r.name) for r in runs] + list(extra)
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(len(handles), 4),
        frameon=False,
    )


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around (possibly unevenly spaced) step centers, for pcolormesh."""
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def _index_ticks(ax, n: int, axis: str, names: Optional[List[str]] = None):
    every = max(1, int(math.ceil(n / 16)))
    ticks = list(range(0, n, every))
    labels = [names[i] for i in ticks] if names else [str(i) for i in ticks]
    if axis == "x":
        ax.set_xticks(ticks, labels, rotation=0 if not names else 30, ha="center" if not names else "right")
    else:
        ax.set_yticks(ticks, labels)


# ---------------------------------------------------------------------- 1. loss curves
def loss_keys(runs: Sequence[Run]) -> List[str]:
    """The panels of the loss figure: ``lm_loss`` and every auxiliary loss some run logs."""
    return ["lm_loss"] + [k for k in AUX_LOSSES if any(r.has(k) for r in runs)]


def plot_losses(runs: Sequence[Run], colors) -> Figure:
    keys = loss_keys(runs)
    rows, cols = _grid(len(keys), 3)
    fig = new_figure(4.6 * cols, 3.3 * rows + 0.9)
    with matplotlib.rc_context(RC):
        axes = _axes_grid(fig, len(keys), 3)
        has_val = any(r.has("val_lm_loss") for r in runs)
        for ax, key in zip(axes, keys):
            for run in runs:
                x, y = run.series(key)
                _plot_curve(ax, x, y, colors[run.name])
                if key == "lm_loss" and run.has("val_lm_loss"):
                    xv, yv = run.series("val_lm_loss")
                    _plot_curve(ax, xv, yv, colors[run.name], linestyle="--", marker="o", smooth=False)
            ax.set_title(LABELS.get(key, key) + ("" if key == "lm_loss" else "\n(mean over MoE layers)"))
            ax.set_xlabel("step")
            ax.set_ylabel("loss (nats / token)" if key == "lm_loss" else "loss value")
            if key == "lm_loss":
                lo = min((np.nanmin(r.series(key)[1]) for r in runs if r.has(key)), default=1.0)
                hi = max((np.nanmax(r.series(key)[1]) for r in runs if r.has(key)), default=1.0)
                if lo > 0 and hi / lo > 3:
                    ax.set_yscale("log")
                    ax.set_ylabel("loss (nats / token, log scale)")
            missing = [r.name for r in runs if not r.has(key)]
            if missing and len(runs) > 1:
                ax.text(0.99, 0.98, "not logged: " + ", ".join(missing), transform=ax.transAxes,
                        ha="right", va="top", fontsize=8, color="0.4")
        extra = []
        if has_val:
            extra = [Line2D([], [], color="0.3", lw=1.8, label="train"),
                     Line2D([], [], color="0.3", lw=1.6, ls="--", marker="o", ms=3.5, label="validation")]
        _run_legend(fig, runs, colors, extra)
        fig.suptitle("Losses over training steps (long curves: faint = raw, solid = EMA)")
    return fig


# ---------------------------------------------------------------------- 2. routing entropy
def plot_entropy_mean(runs: Sequence[Run], colors) -> Figure:
    fig = new_figure(8.0, 4.5)
    with matplotlib.rc_context(RC):
        ax = fig.subplots()
        for run in runs:
            x, y = run.series("routing_entropy")
            _plot_curve(ax, x, y, colors[run.name], label=run.name, smooth=False)
        ax.set_ylim(0, 1.02)
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax.text(ax.get_xlim()[0], 1.0, " uniform routing", va="bottom", ha="left", fontsize=8, color="0.4")
        ax.set_xlabel("step")
        ax.set_ylabel("H(p) / log E   (1 = uniform, 0 = one expert)")
        ax.set_title("Routing entropy, mean over MoE layers")
        _run_legend(fig, runs, colors)
    return fig


def plot_layer_lines(runs: Sequence[Run], layers: Sequence[int], key: str, title: str,
                     ylabel: str, ylim=None) -> Figure:
    """One panel per run, one line per MoE layer (``key/layer_i`` from metrics.jsonl)."""
    rows, cols = _grid(len(runs), 3)
    fig = new_figure(4.8 * cols + 1.3, 3.4 * rows + 0.5)
    lcolors = layer_colors(layers)
    with matplotlib.rc_context(RC):
        axes = _axes_grid(fig, len(runs), 3, sharey=True)
        for ax, run in zip(axes, runs):
            drawn = 0
            for layer in layers:
                x, y = run.series(f"{key}/layer_{layer}")
                if x.size:
                    _plot_curve(ax, x, y, lcolors[layer], smooth=False)
                    drawn += 1
            if not drawn:
                ax.text(0.5, 0.5, f"no {key}/layer_i logged", transform=ax.transAxes, ha="center", color="0.4")
            if ylim:
                ax.set_ylim(*ylim)
            ax.set_title(run.name)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.yaxis.set_tick_params(labelleft=True)
        handles = [Line2D([], [], color=lcolors[l], lw=2.5, label=f"layer {l}") for l in layers]
        fig.legend(handles=handles, loc="outside right upper", title="MoE layer", frameon=False)
        fig.suptitle(title)
    return fig


def plot_overview(runs: Sequence[Run], colors, keys: Sequence[str]) -> Figure:
    """Mean-over-layer metrics, one panel each, runs overlaid."""
    rows, cols = _grid(len(keys), 3)
    fig = new_figure(4.6 * cols, 3.1 * rows + 0.9)
    with matplotlib.rc_context(RC):
        axes = _axes_grid(fig, len(keys), 3)
        for ax, key in zip(axes, keys):
            for run in runs:
                x, y = run.series(key)
                _plot_curve(ax, x, y, colors[run.name], smooth=False)
            ax.set_title(LABELS.get(key, key))
            ax.set_xlabel("step")
            ax.set_ylabel(UNITS.get(key, "value"))
        _run_legend(fig, runs, colors)
        fig.suptitle("Routing metrics, mean over MoE layers")
    return fig


# ---------------------------------------------------------------------- 3. load
def plot_load(runs: Sequence[Run], layers: Sequence[int]) -> Figure:
    """Rows: load CV, MaxVio; columns: runs; one line per layer."""
    cols = len(runs)
    fig = new_figure(max(4.6 * cols, 6.0) + 1.3, 6.6)
    lcolors = layer_colors(layers)
    with matplotlib.rc_context(RC):
        axes = fig.subplots(2, cols, squeeze=False, sharey="row")
        for j, run in enumerate(runs):
            sources = set()
            for layer in layers:
                steps, cv, mv, src = load_series(run, layer)
                if not steps.size:
                    continue
                sources.add(src)
                _plot_curve(axes[0, j], steps, cv, lcolors[layer], smooth=False)
                _plot_curve(axes[1, j], steps, mv, lcolors[layer], smooth=False)
            axes[0, j].set_title(run.name + (f"\n(from {', '.join(sorted(sources))})" if sources else ""))
            for i, ylabel in enumerate(("load CV = std/mean", "MaxVio = max/mean - 1")):
                axes[i, j].set_ylabel(ylabel)
                axes[i, j].set_xlabel("step")
                axes[i, j].set_ylim(bottom=0)
                axes[i, j].yaxis.set_tick_params(labelleft=True)
                if not sources:
                    axes[i, j].text(0.5, 0.5, "no load data", transform=axes[i, j].transAxes,
                                    ha="center", color="0.4")
        handles = [Line2D([], [], color=lcolors[l], lw=2.5, label=f"layer {l}") for l in layers]
        fig.legend(handles=handles, loc="outside right upper", title="MoE layer", frameon=False)
        fig.suptitle("Load imbalance of tokens per expert (0 = perfectly balanced)")
    return fig


def plot_tokens_heatmap(run: Run, data) -> Figure:
    """Expert x step heatmap of tokens per expert / mean, one panel per layer."""
    n = len(data)
    n_experts = max(d[2].shape[0] for d in data)
    rows, cols = _grid(n, 2)
    panel_h = min(max(2.2, 0.22 * n_experts + 1.2), 6.0)
    fig = new_figure(6.0 * cols + 1.2, panel_h * rows + 0.6)
    vmax = max(2.0, float(np.nanmax([np.nanmax(d[2]) for d in data])))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    with matplotlib.rc_context({**RC, "axes.grid": False}):
        axes = _axes_grid(fig, n, 2)
        mesh = None
        for ax, (layer, steps, ratio) in zip(axes, data):
            mesh = ax.pcolormesh(_step_edges(steps), np.arange(ratio.shape[0] + 1) - 0.5, ratio,
                                 cmap=_cmap("RdBu_r"), norm=norm)
            ax.set_ylim(ratio.shape[0] - 0.5, -0.5)
            _index_ticks(ax, ratio.shape[0], "y")
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("step")
            ax.set_ylabel("expert")
        cb = fig.colorbar(mesh, ax=axes, shrink=0.9)
        cb.set_label("tokens / mean tokens per expert  (1 = fair share)")
        fig.suptitle(f"{run.name}: tokens per expert over training (red = overloaded, blue = starved)")
    return fig


# ---------------------------------------------------------------------- 4-6. heatmaps
def plot_heatmaps(run: Run, panels: Sequence[Panel], title: str, cbar_label: str,
                  vmin: float, vmax: float, cmap: str = "viridis", annotate: bool = True,
                  max_cols: int = 4) -> Figure:
    """A grid of matrix panels with one shared colour scale (NaN cells light gray)."""
    n = len(panels)
    n_rows_m = max(p.matrix.shape[0] for p in panels)
    n_cols_m = max(p.matrix.shape[1] for p in panels)
    rows, cols = _grid(n, max_cols)
    cell = 0.42 if max(n_rows_m, n_cols_m) <= 16 else max(0.07, 6.0 / max(n_rows_m, n_cols_m))
    panel_w = min(max(n_cols_m * cell + 1.4, 3.0), 7.5)
    panel_h = min(max(n_rows_m * cell + 1.3, 2.8), 7.5)
    fig = new_figure(panel_w * cols + 1.3, panel_h * rows + 0.8)
    with matplotlib.rc_context({**RC, "axes.grid": False}):
        axes = _axes_grid(fig, n, max_cols)
        im = None
        for ax, panel in zip(axes, panels):
            m = np.ma.masked_invalid(panel.matrix)
            im = ax.imshow(m, cmap=_cmap(cmap), vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
            _index_ticks(ax, m.shape[0], "y")
            _index_ticks(ax, m.shape[1], "x", panel.col_names)
            ax.set_xlabel(panel.col_label)
            ax.set_ylabel(panel.row_label)
            ax.set_title(panel.title + (f" (step {panel.step})" if panel.step is not None else "")
                         + "".join("\n" + note for note in panel.notes))
            if annotate and m.shape[0] * m.shape[1] <= 150:
                for (i, j), v in np.ndenumerate(panel.matrix):
                    if np.isfinite(v):
                        frac = (v - vmin) / max(vmax - vmin, 1e-12)
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7.5,
                                color="black" if frac > 0.6 else "white")
        cb = fig.colorbar(im, ax=axes, shrink=0.9)
        cb.set_label(cbar_label)
        fig.suptitle(f"{run.name}: {title}")
    return fig
