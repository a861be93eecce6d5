"""Shared fixtures, and helpers the test modules import (``from conftest import ...``)."""
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def shipped_configs(pattern: str = "*.yaml"):
    """The shipped run configs in configs/ and configs/paper/ whose names match ``pattern``, sorted."""
    return sorted(glob.glob(os.path.join(CONFIGS, pattern)) + glob.glob(os.path.join(CONFIGS, "paper", pattern)))


def rel(path: str) -> str:
    """``path`` relative to the repository root (the test ids of the configs)."""
    return os.path.relpath(path, ROOT)


@pytest.fixture(scope="module")
def megatron_single_process():
    """A gloo world of one with the CPU backend and megatron-core's parallel state, in this process
    (as in a real run after initialization); torn down, and the backend disabled, after the module."""
    from megatron_moe_spec import cpu
    from megatron_moe_spec.testing.distributed import ParallelSizes, free_port, init_megatron, teardown_megatron

    saved = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    init_megatron(0, 1, ParallelSizes())
    yield
    teardown_megatron()
    cpu.disable()
    # Later tests start subprocesses with os.environ: they must not inherit a rendezvous address (its
    # port may still be held by this process's store).
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def load_script(name: str):
    """Import ``scripts/<name>.py`` as a module (the benchmark scripts are not a package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
