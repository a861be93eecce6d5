"""The megatron-core adapter: thin subclasses substituted into megatron's layer specs.

Importing this package imports megatron-core (and checks its version).
"""
from megatron_moe_spec.core.version import check_megatron_core_version

check_megatron_core_version()
