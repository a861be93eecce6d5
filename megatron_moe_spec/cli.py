"""The ``megatron-moe-spec`` command line.

Subcommands live in their own modules, listed in ``SUBCOMMANDS`` (name -> module path) and imported
only when needed: ``megatron-moe-spec validate ...`` imports the validate module alone; the
top-level ``--help`` imports every listed module to show their one-line help.

The command-module contract (``megatron_moe_spec/commands/<name>.py``):

- ``HELP: str``: one line, shown in ``megatron-moe-spec --help`` and as the command's description;
- ``add_arguments(parser: argparse.ArgumentParser) -> None``: adds the command's arguments;
- ``run(args: argparse.Namespace) -> int``: does the work and returns the exit code (0 = success).

Importing a command module must be cheap: import torch / megatron-core inside ``run``. A
``ConfigError`` raised by any command becomes ``error: <message>`` on stderr and exit code 2,
without a traceback. Add a command by writing its module and one line in ``SUBCOMMANDS``.
"""
import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
    "validate": "megatron_moe_spec.commands.validate",
    "train": "megatron_moe_spec.commands.train",
    "prepare-data": "megatron_moe_spec.commands.prepare_data",
    "report": "megatron_moe_spec.commands.report",
}

EXIT_CONFIG_ERROR = 2


def _load(name: str):
    module = importlib.import_module(SUBCOMMANDS[name])
    for attr in ("HELP", "add_arguments", "run"):
        if not hasattr(module, attr):
            raise AttributeError(f"command module {SUBCOMMANDS[name]} has no {attr} (see cli.py)")
    return module


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that subcommand's module is imported."""
    from megatron_moe_spec import __version__

    parser = argparse.ArgumentParser(
        prog="megatron-moe-spec",
        description="Expert-specialization losses for megatron-core MoE training.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        if only is not None and name != only:
            continue
        module = _load(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_moe_spec.run_config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in SUBCOMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (argparse exits 2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        return int(args._run(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
