"""Subcommands of the ``megatron-moe-spec`` command line. Each module exposes ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``."""
