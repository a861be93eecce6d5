"""report.html: one page, images referenced relatively (they sit next to it in the output folder,
so the folder can be moved or zipped as a whole)."""
from __future__ import annotations

import datetime
import html
import os
from typing import List

from matplotlib.colors import to_hex

from . import analysis
from .build import SECTIONS, Report
from .plots import run_colors

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1500px;
       padding: 0 24px 48px; color: #222; line-height: 1.45; }
h1 { margin-top: 24px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 40px; }
p.how { color: #444; max-width: 1000px; } p.note { color: #8a5a00; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px; vertical-align: -1px; }
table.summary { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.summary th, table.summary td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
table.summary thead th { background: #f4f4f4; }
table.summary td.best { font-weight: 600; }
figure { margin: 12px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
details { margin: 6px 0; } summary { cursor: pointer; }
pre { background: #f7f7f7; padding: 10px; overflow-x: auto; font-size: 12px; }
nav a { margin-right: 14px; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def render(report: Report) -> str:
    runs = report.runs
    colors = {name: to_hex(c) for name, c in run_colors(runs).items()}
    shown = [s for s in SECTIONS if any(img.section == s.key for img in report.images)]
    out: List[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>MoE specialization report: {_e(', '.join(r.name for r in runs))}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>MoE specialization report</h1>",
        "<p>Generated " + _e(datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        + " by <code>megatron-moe-spec report</code>.</p>",
        "<ul class=\"runs\">",
    ]
    for run in runs:
        layers = report.layers.get(run.name, [])
        last_step = run.metrics[-1]["step"]
        out.append(
            f'<li><span class="swatch" style="background:{colors[run.name]}"></span><b>{_e(run.name)}</b> '
            f"&mdash; <code>{_e(run.path)}</code>, {len(run.metrics)} logged steps up to step {last_step}, "
            f"MoE layers shown: {_e(', '.join(map(str, layers)) or 'none')}</li>"
        )
    out.append("</ul>")
    nav = ['<a href="#summary">Summary</a>'] + [f'<a href="#{s.key}">{_e(s.title)}</a>' for s in shown]
    nav.append('<a href="#config">Configs</a>')
    out.append("<nav>" + "".join(nav) + "</nav>")

    out.extend(_summary_table(report, colors))

    for section in shown:
        out.append(f'<section id="{section.key}"><h2>{_e(section.title)}</h2>')
        out.append(f'<p class="how">{_e(section.how_to_read)}</p>')
        for note in report.notes.get(section.key, []):
            out.append(f'<p class="note">{_e(note)}</p>')
        for img in (i for i in report.images if i.section == section.key):
            out.append(_figure(img))
        out.append("</section>")

    if report.omitted:
        out.append('<section id="omitted"><h2>Not shown</h2><ul>')
        titles = {s.key: s.title for s in SECTIONS}
        for key, why in report.omitted.items():
            out.append(f"<li><b>{_e(titles.get(key, key))}</b>: {_e(why)}</li>")
        out.append("</ul></section>")

    out.append('<section id="config"><h2>Resolved configs</h2>')
    for run in runs:
        text = run.config_text if run.config_text else "(no config.yaml in this run directory)"
        out.append(
            f'<details><summary><span class="swatch" style="background:{colors[run.name]}"></span>'
            f"<b>{_e(run.name)}</b> &mdash; {_e(os.path.join(run.path, 'config.yaml'))}</summary>"
            f"<pre>{_e(text)}</pre></details>"
        )
    warnings = [(r.name, w) for r in runs for w in r.warnings]
    if warnings:
        out.append(f"<details><summary>{len(warnings)} warning(s) while reading the runs</summary><ul>")
        out.extend(f"<li>{_e(name)}: {_e(w)}</li>" for name, w in warnings)
        out.append("</ul></details>")
    out.append("</section></body></html>")
    return "\n".join(out) + "\n"


def _figure(img) -> str:
    return (
        f'<figure><a href="{_e(img.filename)}"><img src="{_e(img.filename)}" alt="{_e(img.title)}" '
        f'width="{img.width}" height="{img.height}" loading="lazy"></a></figure>'
    )


def _summary_table(report: Report, colors) -> List[str]:
    runs = report.runs
    table = analysis.summary(runs)
    out = ['<section id="summary"><h2>Summary</h2>',
           '<p class="how">Last logged value and minimum over the run of each metric (mean over MoE layers for '
           "per-layer quantities). Hover a cell for its step."
           + (" Bold: the best last value across runs where lower or higher is clearly better." if len(runs) > 1
              else "") + "</p>",
           '<table class="summary"><thead><tr><th rowspan="2">metric</th>']
    for run in runs:
        out.append(f'<th colspan="2"><span class="swatch" style="background:{colors[run.name]}"></span>'
                   f"{_e(run.name)}</th>")
    out.append("</tr><tr>" + "".join("<th>last</th><th>min</th>" for _ in runs) + "</tr></thead><tbody>")
    for row, stats in table:
        best = None
        if row.better and len(runs) > 1:
            vals = [(s.last, i) for i, s in enumerate(stats) if s is not None and s.last == s.last]
            if len(vals) > 1:
                best = (min(vals) if row.better == "low" else max(vals))[1]
        cells = [f"<td>{_e(row.label)} <code>{_e(row.key)}</code></td>"]
        for i, (run, stat) in enumerate(zip(runs, stats)):
            if stat is None:
                cells.append('<td>&ndash;</td><td>&ndash;</td>')
                continue
            cls = ' class="best"' if i == best else ""
            cells.append(
                f'<td{cls} data-run="{_e(run.name)}" data-metric="{_e(row.key)}" data-stat="last" '
                f'title="step {stat.last_step}">{analysis.fmt(stat.last)}</td>'
                f'<td data-run="{_e(run.name)}" data-metric="{_e(row.key)}" data-stat="min" '
                f'title="step {stat.min_step}">{analysis.fmt(stat.min)}</td>'
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></section>")
    return out
