"""``megatron-moe-spec report RUN_DIR [RUN_DIR ...]``: PNG plots and one HTML page from run directories.

    python -m megatron_moe_spec.commands.report RUN_DIR                # -> RUN_DIR/report/report.html
    python -m megatron_moe_spec.commands.report RUN_A RUN_B --output cmp/   # runs side by side
"""
from __future__ import annotations

import argparse
import sys

HELP = "plots (PNG) and an HTML report from one run directory, or several side by side"

EXIT_OK = 0
EXIT_USAGE = 2
MAX_WARNINGS = 10  # per run, on stderr


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (each with metrics.jsonl; config.yaml and routing.jsonl optional)")
    parser.add_argument("--output", "-o", metavar="DIR", default=None,
                        help="output folder for report.html and the images "
                             "(default for one run: RUN_DIR/report/; required for several runs)")
    parser.add_argument("--layers", metavar="LIST", default=None,
                        help="only these transformer layers (0-based, as in metrics.jsonl), e.g. 1,3,5-7; "
                             "default: every MoE layer")
    parser.add_argument("--format", dest="format", choices=("png", "svg"), default="png",
                        help="image format (default: png)")


def run(args: argparse.Namespace) -> int:
    # Imported here so that `megatron-moe-spec --help` does not pay for matplotlib.
    from megatron_moe_spec.report import ReportError, RunDirError, generate_report

    try:
        report = generate_report(args.run_dirs, output=args.output, layers=args.layers, fmt=args.format)
    except (RunDirError, ReportError) as exc:
        print(f"megatron-moe-spec report: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for run in report.runs:
        for warning in run.warnings[:MAX_WARNINGS]:
            print(f"megatron-moe-spec report: warning: {run.name}: {warning}", file=sys.stderr)
        if len(run.warnings) > MAX_WARNINGS:
            print(f"megatron-moe-spec report: warning: {run.name}: ... and {len(run.warnings) - MAX_WARNINGS} "
                  "more (all of them are listed at the end of report.html)", file=sys.stderr)
    for key, why in report.omitted.items():
        print(f"megatron-moe-spec report: section {key!r} omitted: {why}", file=sys.stderr)
    print(f"wrote {len(report.images)} images and {report.html_path}")
    return EXIT_OK


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-moe-spec report", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
