"""Subcommands of ``megatron-moe-spec``; the contract is in ``megatron_moe_spec/cli.py``."""
