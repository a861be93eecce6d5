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
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import matplotlib
import matplotlib.colors

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

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
    "pathway_nmi": "NMI (0 = independent)",
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

    layer: int
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
                layer=layer,
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
                layer=layer,
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
                layer=layer,
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


def load_series(run: Run, layer: int) -> Dict[str, Tuple[np.ndarray, np.ndarray, str]]:
    """{"load_cv": (steps, values, source), "max_vio": (...)} for one layer: each from metrics.jsonl
    (``load_cv/layer_i``, ``max_vio/layer_i``) when logged, else computed from routing.jsonl
    ``tokens_per_expert``; a quantity with neither is left out."""
    steps_c, counts = run.tokens_matrix(layer)
    out = {}
    for key, compute in (("load_cv", analysis.load_cv), ("max_vio", analysis.max_vio)):
        steps, values = run.series(f"{key}/layer_{layer}")
        if values.size and np.isfinite(values).any():
            out[key] = (steps, values, "metrics.jsonl")
        elif steps_c.size:
            out[key] = (steps_c, compute(counts), "routing.jsonl")
    return out


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
    """(rows, cols) for n panels, at most max_cols wide, rows filled evenly (4 -> 2x2, not 3+1)."""
    n = max(n, 1)
    rows = int(math.ceil(n / max_cols))
    return rows, int(math.ceil(n / rows))


def _axes_grid(fig: Figure, n: int, max_cols: int, **kw):
    rows, cols = _grid(n, max_cols)
    axes = fig.subplots(rows, cols, squeeze=False, **kw).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return list(axes[:n])


def _plot_curve(ax, x, y, color, linestyle="-", marker=None, label=None, smooth=True, raw=True):
    """A curve; long noisy curves are drawn raw (faint; left out with ``raw=False``, for plots with
    one line per layer) plus a centered moving average (solid). Markers only while there are few
    points."""
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if not x.size:
        return
    window = analysis.smoothing_window(len(y)) if smooth else None
    if marker is not None and len(y) > 40:
        marker = None
    if window is None:
        ax.plot(x, y, color=color, linestyle=linestyle, marker=marker, markersize=3.5, lw=1.6, label=label)
    else:
        if raw:
            ax.plot(x, y, color=color, linestyle=linestyle, lw=0.8, alpha=0.3)
        ax.plot(x, analysis.moving_average(y, window), color=color, linestyle=linestyle, lw=1.8, label=label)


def _run_legend(fig: Figure, runs: Sequence[Run], colors, extra: Sequence[Line2D] = ()):
    handles = [Line2D([], [], color=colors[r.name], lw=2.5, label=r.name) for r in runs] + list(extra)
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(len(handles), 4),
        frameon=False,
    )


def _layer_legend(fig: Figure, handles):
    """The per-layer legend, right of the panels, vertically centred (clear of the title); several
    columns when there are many layers."""
    fig.legend(handles=handles, loc="outside right center", title="MoE layer", frameon=False,
               ncols=int(math.ceil(len(handles) / 12)))


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
ZOOM = "lm_loss:zoom"


def loss_keys(runs: Sequence[Run]) -> List[str]:
    """The panels of the loss figure: ``lm_loss``, the LM loss over the second half of training
    (linear scale, where runs differ), and every auxiliary loss some run logs."""
    return ["lm_loss", ZOOM] + [k for k in AUX_LOSSES if any(r.has(k) for r in runs)]


def _second_half(x: np.ndarray, y: np.ndarray, start: float):
    keep = x >= start
    return x[keep], y[keep]


def plot_losses(runs: Sequence[Run], colors) -> Figure:
    keys = loss_keys(runs)
    rows, cols = _grid(len(keys), 3)
    fig = new_figure(4.6 * cols, 3.3 * rows + 0.9)
    with matplotlib.rc_context(RC):
        axes = _axes_grid(fig, len(keys), 3)
        has_val = any(r.has("val_lm_loss") for r in runs)
        last_step = max(float(r.metrics[-1]["step"]) for r in runs)
        half = last_step / 2
        for ax, key in zip(axes, keys):
            data_key = "lm_loss" if key == ZOOM else key
            for run in runs:
                x, y = run.series(data_key)
                if key == ZOOM:
                    x, y = _second_half(x, y, half)
                _plot_curve(ax, x, y, colors[run.name])
                if data_key == "lm_loss" and run.has("val_lm_loss"):
                    xv, yv = run.series("val_lm_loss")
                    if key == ZOOM:
                        xv, yv = _second_half(xv, yv, half)
                    _plot_curve(ax, xv, yv, colors[run.name], linestyle="--", marker="o", smooth=False)
            ax.set_xlabel("step")
            if key == "lm_loss":
                ax.set_title("LM loss")
                ax.set_ylabel("loss (nats / token)")
                values = np.concatenate([r.series(key)[1] for r in runs] + [np.zeros(0)])
                values = values[np.isfinite(values)]
                if values.size and values.min() > 0 and values.max() / values.min() > 3:
                    ax.set_yscale("log")
                    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)))
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                    ax.yaxis.set_minor_formatter(NullFormatter())
                    ax.set_ylabel("loss (nats / token, log scale)")
            elif key == ZOOM:
                ax.set_title(f"LM loss, second half (step \u2265 {half:g})")
                ax.set_ylabel("loss (nats / token)")
            else:
                ax.set_title(LABELS.get(key, key) + "\n(mean over MoE layers)")
                ax.set_ylabel("loss value")
            missing = [r.name for r in runs if not r.has(data_key)]
            if missing and (len(runs) > 1 or key == "lm_loss"):
                ax.text(0.99, 0.98, "not logged: " + ", ".join(missing), transform=ax.transAxes,
                        ha="right", va="top", fontsize=8, color="0.4")
        extra = []
        if has_val:
            extra = [Line2D([], [], color="0.3", lw=1.8, label="train"),
                     Line2D([], [], color="0.3", lw=1.6, ls="--", marker="o", ms=3.5, label="validation")]
        _run_legend(fig, runs, colors, extra)
        fig.suptitle("Losses over training steps (long curves: faint = raw, solid = centered moving average)")
    return fig


# ---------------------------------------------------------------------- 2. routing entropy
def unit_ylim(values: Iterable[float]) -> Tuple[float, float]:
    """y-limits for a quantity in [0, 1] that stays near 1 (normalized entropy): from a little below the
    smallest finite value to a little above 1, so that small differences near 1 stay visible and the
    line at 1 is still drawn; (0, 1.02) when there is no finite value."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 1.02
    span = max(1.0 - min(finite), 0.01)
    return max(0.0, min(finite) - 0.15 * span), 1.0 + 0.05 * span


def plot_entropy_mean(runs: Sequence[Run], colors) -> Figure:
    fig = new_figure(8.0, 4.5)
    with matplotlib.rc_context(RC):
        ax = fig.subplots()
        for run in runs:
            x, y = run.series("routing_entropy")
            _plot_curve(ax, x, y, colors[run.name], label=run.name)
        ax.set_ylim(*unit_ylim(v for run in runs for v in run.series("routing_entropy")[1]))
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax.text(ax.get_xlim()[0], 1.0, " uniform routing", va="bottom", ha="left", fontsize=8, color="0.4")
        ax.set_xlabel("step")
        ax.set_ylabel("H(p) / log E   (1 = uniform, 0 = one expert)\naxis zoomed to the data")
        ax.set_title("Routing entropy, mean over MoE layers")
        _run_legend(fig, runs, colors)
    return fig


def plot_layer_lines(runs: Sequence[Run], layers: Sequence[int], key: str, title: str,
                     ylabel: str, ylim=None, colors=None) -> Figure:
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
                    _plot_curve(ax, x, y, lcolors[layer], raw=False)
                    drawn += 1
            if not drawn:
                ax.text(0.5, 0.5, f"no {key}/layer_i logged", transform=ax.transAxes, ha="center", color="0.4")
            if ylim:
                ax.set_ylim(*ylim)
            ax.set_title(run.name, color=_title_color(colors, run))
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.yaxis.set_tick_params(labelleft=True)
        handles = [Line2D([], [], color=lcolors[l], lw=2.5, label=f"layer {l}") for l in layers]
        _layer_legend(fig, handles)
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
                _plot_curve(ax, x, y, colors[run.name])
            ax.set_title(LABELS.get(key, key))
            ax.set_xlabel("step")
            ax.set_ylabel(UNITS.get(key, "value"))
            if key == "dead_experts":
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
                top = max(1.0, ax.get_ylim()[1])
                ax.set_ylim(bottom=-0.04 * top, top=top)  # a line at 0 stays visible
        _run_legend(fig, runs, colors)
        fig.suptitle("Routing metrics, mean over MoE layers")
    return fig


# ---------------------------------------------------------------------- 3. load
def plot_load(runs: Sequence[Run], layers: Sequence[int], colors=None) -> Figure:
    """Rows: load CV, MaxVio; columns: runs; one line per layer."""
    cols = len(runs)
    fig = new_figure(max(4.6 * cols, 6.0) + 1.3, 6.6)
    lcolors = layer_colors(layers)
    with matplotlib.rc_context(RC):
        axes = fig.subplots(2, cols, squeeze=False, sharey="row")
        for j, run in enumerate(runs):
            sources = set()
            for layer in layers:
                for key, (steps, values, src) in load_series(run, layer).items():
                    sources.add(src)
                    _plot_curve(axes[0 if key == "load_cv" else 1, j], steps, values, lcolors[layer], raw=False)
            axes[0, j].set_title(run.name + (f"\n(from {', '.join(sorted(sources))})" if sources else ""),
                                 color=_title_color(colors, run))
            for i, ylabel in enumerate(("load CV = std/mean", "MaxVio = max/mean - 1")):
                axes[i, j].set_ylabel(ylabel)
                axes[i, j].set_xlabel("step")
                axes[i, j].yaxis.set_tick_params(labelleft=True)
                if not sources:
                    axes[i, j].text(0.5, 0.5, "no load data", transform=axes[i, j].transAxes,
                                    ha="center", color="0.4")
        for ax in axes[:, 0]:  # after all runs are drawn: the rows share y
            ax.set_ylim(bottom=0)
        handles = [Line2D([], [], color=lcolors[l], lw=2.5, label=f"layer {l}") for l in layers]
        _layer_legend(fig, handles)
        fig.suptitle("Load imbalance of tokens per expert (0 = perfectly balanced)")
    return fig


def _colorbar(fig: Figure, mappable, axes, rows: int, extend: str = "neither"):
    """One colour bar for a grid: at the right of one or two rows, above taller grids (so it stays
    next to the first panels instead of stretching over the whole page)."""
    if rows <= 2:
        return fig.colorbar(mappable, ax=axes, shrink=0.9, aspect=25, extend=extend)
    return fig.colorbar(mappable, ax=axes, location="top", shrink=0.6, aspect=40, pad=0.01, extend=extend)


def _layer_run_axes(fig: Figure, layers: Sequence[int], runs: Sequence[Run], max_cols: int = 4):
    """{(layer, run name): axes}. One run: the layers wrap over up to ``max_cols`` columns.
    Several runs: one row per layer, one column per run (the same layer of each run side by side)."""
    if len(runs) == 1:
        axes = _axes_grid(fig, len(layers), max_cols)
        return {(l, runs[0].name): ax for l, ax in zip(layers, axes)}
    grid = fig.subplots(len(layers), len(runs), squeeze=False)
    return {(l, r.name): grid[i, j] for i, l in enumerate(layers) for j, r in enumerate(runs)}


def _layer_run_shape(n_layers: int, n_runs: int, max_cols: int = 4) -> Tuple[int, int]:
    return _grid(n_layers, max_cols) if n_runs == 1 else (n_layers, n_runs)


def _title_color(colors, run: Run):
    """Panel titles that name a run are drawn in the run's colour (the same in every figure), made a
    little darker so that light colours stay legible as text."""
    if not colors or run.name not in colors:
        return "black"
    r, g, b = matplotlib.colors.to_rgb(colors[run.name])
    return (0.8 * r, 0.8 * g, 0.8 * b)


def _panel_title(run: Run, several: bool, text: str) -> str:
    return f"{run.name}: {text}" if several else text


def _empty(ax, text: str):
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.45")


def plot_tokens_heatmap(runs: Sequence[Run], data: Dict[str, list], colors=None) -> Figure:
    """Expert x step heatmaps of tokens per expert / mean; ``data[run name]`` is ``tokens_panels``."""
    layers = sorted({d[0] for v in data.values() for d in v})
    n_experts = max(d[2].shape[0] for v in data.values() for d in v)
    max_cols = 1 if len(layers) <= 4 else 2  # one run: wide panels (the step axis needs the width)
    rows, cols = _layer_run_shape(len(layers), len(runs), max_cols)
    panel_h = min(max(2.4, 0.2 * n_experts + 1.3), 6.0)
    fig = new_figure(5.6 * cols + 1.3, panel_h * rows + 0.7)
    vmax = max(2.0, float(max(np.nanmax(d[2]) for v in data.values() for d in v if np.isfinite(d[2]).any())))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    several = len(runs) > 1
    with matplotlib.rc_context({**RC, "axes.grid": False}):
        cells = _layer_run_axes(fig, layers, runs, max_cols)
        mesh = None
        for run in runs:
            by_layer = {d[0]: d for d in data.get(run.name, [])}
            for layer in layers:
                ax = cells[(layer, run.name)]
                if layer not in by_layer:
                    _empty(ax, f"{run.name}: layer {layer}\nno tokens_per_expert")
                    continue
                _, steps, ratio = by_layer[layer]
                mesh = ax.pcolormesh(_step_edges(steps), np.arange(ratio.shape[0] + 1) - 0.5, ratio,
                                     cmap=_cmap("RdBu_r"), norm=norm)
                ax.set_ylim(ratio.shape[0] - 0.5, -0.5)
                _index_ticks(ax, ratio.shape[0], "y")
                ax.set_title(_panel_title(run, several, f"layer {layer}"), color=_title_color(colors, run))
                ax.set_xlabel("step")
                ax.set_ylabel("expert")
        cb = _colorbar(fig, mesh, list(cells.values()), rows)
        cb.set_label("tokens / mean tokens per expert  (1 = fair share)")
        fig.suptitle(("" if several else f"{runs[0].name}: ")
                     + "tokens per expert over training (red = overloaded, blue = starved)")
    return fig


# ---------------------------------------------------------------------- 4-6. heatmaps
def plot_heatmaps(runs: Sequence[Run], panels: Dict[str, List[Panel]], title: str, cbar_label: str,
                  vmin: float, vmax: float, cmap: str = "viridis", annotate: bool = True,
                  colors=None) -> Figure:
    """Matrix panels with one colour scale shared by every layer and run (NaN cells light gray).
    ``panels[run name]`` lists that run's panels; ``Panel.layer`` places them in the grid."""
    all_panels = [p for ps in panels.values() for p in ps]
    layers = sorted({p.layer for p in all_panels})
    n_rows_m = max(p.matrix.shape[0] for p in all_panels)
    n_cols_m = max(p.matrix.shape[1] for p in all_panels)
    rows, cols = _layer_run_shape(len(layers), len(runs))
    cell = 0.42 if max(n_rows_m, n_cols_m) <= 16 else max(0.07, 6.0 / max(n_rows_m, n_cols_m))
    panel_w = min(max(n_cols_m * cell + 1.4, 3.0), 7.5)
    panel_h = min(max(n_rows_m * cell + 1.3, 2.8), 7.5)
    fig = new_figure(panel_w * cols + 1.3, panel_h * rows + 0.8)
    several = len(runs) > 1
    with matplotlib.rc_context({**RC, "axes.grid": False}):
        cells = _layer_run_axes(fig, layers, runs)
        im = None
        for run in runs:
            by_layer = {p.layer: p for p in panels.get(run.name, [])}
            for layer in layers:
                ax = cells[(layer, run.name)]
                panel = by_layer.get(layer)
                if panel is None:
                    _empty(ax, f"{run.name}: layer {layer}\nnot logged")
                    continue
                m = np.ma.masked_invalid(panel.matrix)
                im = ax.imshow(m, cmap=_cmap(cmap), vmin=vmin, vmax=vmax, aspect="auto",
                               interpolation="nearest")
                _index_ticks(ax, m.shape[0], "y")
                _index_ticks(ax, m.shape[1], "x", panel.col_names)
                ax.set_xlabel(panel.col_label)
                ax.set_ylabel(panel.row_label)
                text = panel.title + (f" (step {panel.step})" if panel.step is not None else "")
                ax.set_title(_panel_title(run, several, text) + "".join("\n" + n for n in panel.notes),
                             color=_title_color(colors, run))
                if annotate and m.shape[0] * m.shape[1] <= 150:
                    for (i, j), v in np.ndenumerate(panel.matrix):
                        if np.isfinite(v):
                            frac = (v - vmin) / max(vmax - vmin, 1e-12)
                            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7.5,
                                    color="black" if frac > 0.6 else "white")
        above = any(np.nanmax(p.matrix) > vmax for p in all_panels if np.isfinite(p.matrix).any())
        cb = _colorbar(fig, im, list(cells.values()), rows, extend="max" if above else "neither")
        cb.set_label(cbar_label)
        fig.suptitle(title if several else f"{runs[0].name}: {title}")
    return fig
