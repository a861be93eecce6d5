"""Build a report: read the runs, draw every figure whose data is present, write report.html."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from . import analysis, plots
from .runs import Run, load_runs

FORMATS = ("png", "svg")
#: Without --layers, heatmap figures show at most this many MoE layers (evenly spread).
MAX_HEATMAP_LAYERS = 6


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    how_to_read: str


#: The sections of the page, in order (the summary table and the configs come first, in html.py).
SECTIONS = (
    Section("losses", "Loss curves",
            "LM loss (solid: train, dashed: validation), the LM loss over the second half of training on a "
            "linear scale (where runs differ), and every auxiliary loss that is logged, as the mean over MoE "
            "layers. Long curves: faint = raw, solid = centered moving average. Each run has one colour in "
            "every figure."),
    Section("entropy", "Routing entropy",
            "Normalized entropy of the router's pre-top-k distribution, mean over tokens: 1 = uniform over "
            "all experts, 0 = all mass on one expert. Falling entropy means more decisive routing. The second "
            "figure shows each MoE layer of each run."),
    Section("load", "Expert load",
            "Load CV (std/mean of tokens per expert) and MaxVio (max/mean - 1): 0 is perfectly balanced. The "
            "heatmaps show each expert's tokens divided by the mean per expert over the steps: white = fair "
            "share, red = overloaded, blue = starved (dark blue = dead expert)."),
    Section("domain", "Expert \u00d7 domain",
            "P(domain | expert) at the last logged step: the top-1 tokens of each expert split by the domain "
            "label of the data, each row sums to 1. A specialized expert has one bright cell in its row; a row "
            "equal to the data's domain mix means no specialization. Gray rows: experts that got no token."),
    Section("transition", "Adjacent-layer pathways",
            "P(top-1 expert at the next MoE layer | top-1 expert at layer i) at the last logged step, each row "
            "sums to 1. Uniform rows (1/E everywhere) mean the layers route independently; a few bright cells "
            "per row mean consistent pathways through the network (what R_cp encourages)."),
    Section("similarity", "Expert similarity",
            "Mean |cos| between the SwiGLU activations of two experts on the tokens they share, at the last "
            "logged step (0 where the pair was never co-activated; diagonal masked). Lower means more "
            "distinct experts (what R_sp encourages). All runs share one colour scale."),
    Section("overview", "Other routing metrics",
            "Mean over MoE layers of the remaining routing metrics (definitions: the spec, section Metrics)."),
)
SECTION_KEYS = tuple(s.key for s in SECTIONS)


@dataclass
class Image:
    section: str
    filename: str
    title: str
    width: int
    height: int


@dataclass
class Report:
    output_dir: str
    html_path: str
    runs: List[Run]
    layers: Dict[str, List[int]]
    images: List[Image] = field(default_factory=list)
    omitted: Dict[str, str] = field(default_factory=dict)
    """section key -> why it is not shown."""
    notes: Dict[str, List[str]] = field(default_factory=dict)
    """section key -> remarks shown under the section title (e.g. a run that lacks the data)."""


class ReportError(Exception):
    """A usage problem (bad --layers, unknown format, ...)."""


def parse_layers(text: Optional[str]) -> Optional[List[int]]:
    """``"1,3,5-7"`` -> [1, 3, 5, 6, 7]; None/"" -> None (all MoE layers)."""
    if text is None or not str(text).strip():
        return None
    out = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ReportError(f"--layers: {part!r} is not a layer index or range (expected e.g. 1,3,5-7)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo:
            raise ReportError(f"--layers: empty range {part!r}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def _shared_vmax(panels_per_run: Iterable, floor: float) -> float:
    """A colour-scale maximum shared by all runs: the 99th percentile of the finite values (so that a
    single cell of an expert with a handful of tokens does not wash out the rest; higher cells show
    in the top colour and the colour bar gets an arrow), rounded up to 0.05."""
    values = [p.matrix[np.isfinite(p.matrix)] for panels in panels_per_run for p in panels]
    values = np.concatenate(values) if values else np.zeros(0)
    if not values.size:
        return floor
    top = float(np.percentile(values, 99))
    return min(1.0, max(floor, math.ceil(top * 20 - 1e-9) / 20))


def generate_report(run_dirs: Sequence[str], output: Optional[str] = None, layers: Optional[str] = None,
                    fmt: str = "png") -> Report:
    """Read ``run_dirs`` and write the figures and ``report.html`` into ``output`` (default: the single
    run's ``report/`` folder). Raises ``RunDirError`` (bad run dir) or ``ReportError`` (bad option)."""
    if fmt not in FORMATS:
        raise ReportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not run_dirs:
        raise ReportError("give at least one RUN_DIR")
    if output is None:
        if len(run_dirs) > 1:
            raise ReportError("--output DIR is required when reporting on several runs")
        output = os.path.join(run_dirs[0], "report")
    runs = load_runs(list(run_dirs))

    wanted = parse_layers(layers)
    per_run_layers: Dict[str, List[int]] = {}
    for run in runs:
        moe = run.moe_layers
        per_run_layers[run.name] = [l for l in moe if wanted is None or l in wanted]
    if wanted is not None and not any(per_run_layers.values()):
        have = sorted({l for r in runs for l in r.moe_layers})
        raise ReportError(f"--layers {layers}: none of these is an MoE layer of the runs (MoE layers: {have})")
    all_layers = sorted({l for ls in per_run_layers.values() for l in ls})
    # Heatmaps take one panel per layer (and run): without --layers, a deep model shows an evenly
    # spread subset, so that the page stays readable; --layers picks any others.
    heat_layers = all_layers if wanted is not None else analysis.spread_layers(all_layers, MAX_HEATMAP_LAYERS)
    heat_per_run = {name: [l for l in ls if l in heat_layers] for name, ls in per_run_layers.items()}
    heat_note = None
    if heat_layers != all_layers:
        heat_note = (f"showing {len(heat_layers)} of {len(all_layers)} MoE layers "
                     f"({', '.join(map(str, heat_layers))}); choose others with --layers")

    try:
        os.makedirs(output, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create the output folder {output!r}: {exc}") from exc
    had_report = os.path.isfile(os.path.join(output, "report.html"))
    report = Report(output_dir=os.path.abspath(output), html_path=os.path.join(os.path.abspath(output), "report.html"),
                    runs=runs, layers=per_run_layers)
    colors = plots.run_colors(runs)

    def emit(section, fig, stem, title):
        filename = f"{stem}.{fmt}"
        w, h = plots.save(fig, os.path.join(output, filename), fmt)
        report.images.append(Image(section, filename, title, w, h))

    def missing_note(section, runs_without, what):
        if runs_without and len(runs_without) < len(runs):
            report.notes.setdefault(section, []).append(f"not logged ({what}): " + ", ".join(runs_without))

    # 1. losses
    emit("losses", plots.plot_losses(runs, colors), "loss_curves", "Loss curves")

    # 2. routing entropy
    with_entropy = [r for r in runs if r.has("routing_entropy")]
    with_layer_entropy = [r for r in runs if r.metric_layers("routing_entropy")]
    if with_entropy:
        emit("entropy", plots.plot_entropy_mean(with_entropy, colors), "entropy_mean",
             "Routing entropy, mean over MoE layers")
    if with_layer_entropy and all_layers:
        emit("entropy", plots.plot_layer_lines(with_layer_entropy, all_layers, "routing_entropy",
                                               "Routing entropy per MoE layer", "H(p) / log E (zoomed)",
                                               ylim=plots.unit_ylim(
                                                   v for r in with_layer_entropy for layer in all_layers
                                                   for v in r.series(f"routing_entropy/layer_{layer}")[1]),
                                               colors=colors),
             "entropy_layers", "Routing entropy per MoE layer")
    if not with_entropy and not with_layer_entropy:
        report.omitted["entropy"] = "no run logs routing_entropy"
    missing_note("entropy", [r.name for r in runs if r not in with_entropy], "routing_entropy")

    # 3. load
    with_load = [r for r in runs if any(plots.load_series(r, l) for l in per_run_layers[r.name])]
    if with_load:
        emit("load", plots.plot_load(with_load, all_layers, colors), "load_balance", "Load CV and MaxVio per layer")
    tokens = {run.name: plots.tokens_panels(run, heat_per_run[run.name]) for run in runs}
    with_tokens = [run for run in runs if tokens[run.name]]
    if with_tokens:
        if heat_note:
            report.notes.setdefault("load", []).append("tokens-per-expert heatmaps: " + heat_note)
        emit("load", plots.plot_tokens_heatmap(with_tokens, tokens, colors), "tokens_per_expert",
             "Tokens per expert over steps")
    if not with_load:
        report.omitted["load"] = "no run logs load_cv/max_vio per layer or tokens_per_expert"
    missing_note("load", [r.name for r in runs if not r.tokens_per_expert], "routing.jsonl tokens_per_expert")

    # 4-6. last-step matrices
    matrix_sections = (
        ("domain", plots.domain_panels, "expert_domain", "P(domain | expert), last logged step",
         "P(domain | expert)   (each row sums to 1)", "expert_domain", lambda ps: (0.0, 1.0), "viridis"),
        ("transition", plots.transition_panels, "transition",
         "top-1 transitions to the next MoE layer, P(next | current), last logged step",
         "P(top-1 at next MoE layer | top-1 here)   (rows sum to 1)", "transition",
         lambda ps: (0.0, _shared_vmax(ps, 0.1)), "magma"),
        ("similarity", plots.similarity_panels, "similarity",
         "expert similarity (mean |cos| of co-activated pairs), last logged step",
         "mean |cos| of SwiGLU activations (0 = never co-activated)", "similarity",
         lambda ps: (0.0, _shared_vmax(ps, 0.1)), "viridis"),
    )
    for section, make, stem, title, cbar, field_name, scale, cmap in matrix_sections:
        panels = {run.name: make(run, heat_per_run[run.name]) for run in runs}
        vmin, vmax = scale(panels.values())
        drawn = [run.name for run in runs if panels[run.name]]
        if drawn:
            if heat_note:
                report.notes.setdefault(section, []).append(heat_note)
            fig = plots.plot_heatmaps([r for r in runs if r.name in drawn], panels, title, cbar, vmin, vmax,
                                      cmap=cmap, colors=colors)
            emit(section, fig, stem, title)
        if not drawn:
            report.omitted[section] = f"no run logs {field_name} in routing.jsonl" + (
                " for the selected layers" if wanted is not None else "")
        missing_note(section, [r.name for r in runs if r.name not in drawn], f"routing.jsonl {field_name}")

    # overview of the other mean metrics
    keys = [k for k in plots.OVERVIEW_METRICS if any(r.has(k) for r in runs)]
    if keys:
        emit("overview", plots.plot_overview(runs, colors, keys), "metrics_overview", "Routing metrics overview")
    else:
        report.omitted["overview"] = "no run logs any routing metric"

    from .html import render

    with open(report.html_path, "w") as f:
        f.write(render(report))
    if had_report:
        _remove_stale_images(output, {img.filename for img in report.images})
    return report


#: The image names the report writes (stem.<format>).
IMAGE_STEMS = ("loss_curves", "entropy_mean", "entropy_layers", "load_balance", "tokens_per_expert",
               "expert_domain", "transition", "similarity", "metrics_overview")


def _remove_stale_images(output: str, written) -> None:
    """In a folder that already held a report, delete the report's own images that this report did
    not write again (e.g. expert_domain.png of an earlier run with domains), so the folder matches
    the page. Only the names in IMAGE_STEMS are touched."""
    for stem in IMAGE_STEMS:
        for ext in FORMATS:
            name = f"{stem}.{ext}"
            path = os.path.join(output, name)
            if name not in written and os.path.isfile(path):
                os.remove(path)
