"""Run a function on N gloo processes with megatron-core's parallel state initialized.

    results = run_distributed(fn, world_size=4, parallel=ParallelSizes(tp=2, ep=2), args=(cfg,))

``fn`` runs in every rank (a fresh process with the CPU backend enabled, torch.distributed
initialized with gloo and ``megatron.core.parallel_state`` initialized with the given sizes and seeded)
and its return value, which must be picklable, comes back in ``results[rank]``. ``fn`` must be a
module-level function (it is pickled by reference).

Processes are started by a ``forkserver`` that has imported torch and megatron-core once (a rank then
starts in well under a second instead of the ~8 s of CPU those imports take here); each rank gets the
caller's environment variables as they are at the call. ``MMS_TEST_START_METHOD=spawn`` starts every
rank from scratch instead.

It fails loudly, never hangs: if any rank raises, the others are killed and ``RankFailure`` carries the
failing rank's traceback; if not every rank has answered within ``timeout`` seconds, all are killed and
``TimeoutError`` names the ranks that were still running.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import queue as queue_module
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.multiprocessing as mp

from megatron_moe_spec.training.distributed import free_port  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class ParallelSizes:
    """Megatron's parallel sizes; data parallelism is implied by the world size."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    """Expert tensor parallel size; None = same as tp (Megatron's default)."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved 1F1B); None = not interleaved."""
    cp: int = 1
    """Context parallel size (megatron-core's local attention on CPU supports only 1)."""

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in dataclasses.asdict(self).items() if v not in (None, 1)]
        return ",".join(parts) or "single"


class RankFailure(RuntimeError):
    """A rank raised; the message carries its traceback."""


# Imported once by the forkserver (an ImportError is ignored there: e.g. HybridModel before 0.19).
_PRELOAD = [
    "torch",
    "torch.distributed",
    "megatron.core.parallel_state",
    "megatron.core.models.gpt",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron_moe_spec.cpu",
    "megatron_moe_spec.core.layer_specs",
    "megatron_moe_spec.testing.tiny_gpt",
]


def _context():
    method = os.environ.get("MMS_TEST_START_METHOD", "forkserver")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)  # no effect once the server runs
    return ctx




def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    parallel: ParallelSizes = ParallelSizes(),
    args: Sequence[Any] = (),
    kwargs: Optional[Dict[str, Any]] = None,
    timeout: float = 300.0,
    seed: int = 1234,
) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the per-rank results."""
    ctx = _context()
    results_queue = ctx.Queue()
    port = free_port()
    processes = []
    for rank in range(world_size):
        p = ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, parallel, seed, fn, tuple(args), dict(kwargs or {}),
                  results_queue, dict(os.environ)),
            daemon=True,
        )
        p.start()
        processes.append(p)

    results: Dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise TimeoutError(
                    f"run_distributed({fn.__name__}, world_size={world_size}, "
                    f"{parallel.describe()}): ranks {missing} did not finish within {timeout:.0f}s"
                )
            try:
                rank, ok, payload = results_queue.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(processes) if not p.is_alive() and r not in results]
                if dead:
                    # A rank died without reporting (e.g. killed, segfault): give the queue a
                    # moment to deliver a late report, then fail.
                    try:
                        rank, ok, payload = results_queue.get(timeout=2.0)
                    except queue_module.Empty:
                        codes = {r: processes[r].exitcode for r in dead}
                        raise RankFailure(
                            f"rank(s) {dead} of {fn.__name__} exited without a result "
                            f"(exit codes {codes})"
                        ) from None
                else:
                    continue
            if not ok:
                raise RankFailure(f"rank {rank} of {fn.__name__} ({parallel.describe()}) raised:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in processes:
            if p.is_alive() and len(results) < world_size:
                p.kill()
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world_size)]


def _rank_main(rank, world_size, port, parallel, seed, fn, args, kwargs, results_queue, environ):
    try:
        os.environ.clear()  # the caller's environment, not the forkserver's (started earlier)
        os.environ.update(environ)
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
        )
        import warnings

        # megatron-core's import-time notices about missing TE/apex, once per rank, say nothing new.
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
        warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
        import torch

        # Several ranks share two cores: one thread each avoids oversubscription.
        torch.set_num_threads(1)
        init_megatron(rank, world_size, parallel, seed)
        try:
            result = fn(*args, **kwargs)
        finally:
            teardown_megatron()
        # Plain pickle (by value): torch's queue would share tensor storage through file
        # descriptors that vanish when this process exits.
        results_queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results_queue.put((rank, False, traceback.format_exc()))


def init_megatron(rank: int, world_size: int, parallel: ParallelSizes, seed: int = 1234) -> None:
    """Initialize gloo, the CPU backend and megatron-core's parallel state in this process."""
    import datetime

    import torch
    import torch.distributed as dist

    from megatron_moe_spec import cpu

    cpu.enable()
    if not dist.is_initialized():
        dist.init_process_group(
            backend="gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=120),
        )
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_moe_spec.training.distributed import init_model_parallel

    init_model_parallel(parallel)
    # The same seed on every rank (unlike training's per-stage seeds): layouts must be comparable.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def teardown_megatron() -> None:
    from megatron_moe_spec.training.distributed import teardown

    teardown()
