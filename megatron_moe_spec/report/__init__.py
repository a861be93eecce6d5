"""Plots and an HTML page from run directories (``megatron-moe-spec report``).

- ``runs``: read a run directory (config.yaml, metrics.jsonl, routing.jsonl) into a ``Run``.
- ``analysis``: the arithmetic behind the plots and the summary table (row normalization, load CV, ...).
- ``plots``: the figures (matplotlib, Agg, no pyplot).
- ``html``: report.html.
- ``build``: ``generate_report`` ties them together.
- ``synthetic``: a simulated run directory for tests and docs.

Imports neither torch nor Megatron.
"""
from .build import ReportError, generate_report, parse_layers  # noqa: F401
from .runs import Run, RunDirError, load_run, load_runs  # noqa: F401
