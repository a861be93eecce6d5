"""Which megatron-core versions the adapter supports, checked once at import."""
from __future__ import annotations

from packaging.version import Version

SUPPORTED = (Version("0.16.0"), Version("0.20.0"))
"""[min, max): the range setup.py declares. 0.15.x lacks MoESubmodules.router, route/postprocess and
the 2-argument routed_experts_compute (docs/compatibility.md). CI runs 0.16.1 and 0.19.2."""


def megatron_core_version() -> Version:
    from megatron.core import package_info

    return Version(package_info.__version__)


def check_megatron_core_version() -> Version:
    version = megatron_core_version()
    low, high = SUPPORTED
    if not (low <= version < high):
        raise ImportError(
            f"megatron-moe-spec supports megatron-core >={low},<{high}; found {version}. "
            f"Install a supported version: pip install 'megatron-core>={low},<{high}'"
        )
    return version
