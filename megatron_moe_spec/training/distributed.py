"""Process groups: torchrun's environment -> torch.distributed -> megatron-core's parallel_state.

torchrun (scripts/pretrain.sh) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A plain
``python -m megatron_moe_spec train ...`` without them runs as a single process. With CUDA the backend
is nccl (one GPU per process, ``LOCAL_RANK``); without CUDA it is gloo and the CPU backend
(``megatron_moe_spec.cpu``) is enabled, which rank 0 says once.
"""
from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass

import numpy
import torch


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int


def launch_env() -> LaunchEnv:
    """The torchrun variables (defaults: a single process)."""
    return LaunchEnv(rank=int(os.environ.get("RANK", "0")),
                     world_size=int(os.environ.get("WORLD_SIZE", "1")),
                     local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def use_cuda(device: str) -> bool:
    """``training.device`` resolved: cuda when asked for or (auto) available."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def init_distributed(device: str, timeout_s: int = 600) -> LaunchEnv:
    """Initialize torch.distributed from the torchrun environment (idempotent)."""
    env = launch_env()
    if use_cuda(device):
        torch.cuda.set_device(env.local_rank)
        backend = "nccl"
    else:
        from megatron_moe_spec import cpu

        cpu.enable()
        backend = "gloo"
        if env.rank == 0:
            print("no CUDA: running on CPU with gloo", flush=True)
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" not in os.environ and env.world_size == 1:
            # A single process started without torchrun: an in-memory store, no TCP port to race for
            # (a port found free can be taken before the store listens on it: EADDRINUSE).
            torch.distributed.init_process_group(backend=backend, store=torch.distributed.HashStore(),
                                                 rank=0, world_size=1, timeout=timeout)
        else:
            torch.distributed.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                                 timeout=timeout)
    return env


def init_model_parallel(sizes) -> None:
    """megatron-core's process groups for ``sizes`` (a ``run_config.ParallelSizes``)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        virtual_pipeline_model_parallel_size=sizes.vpp,
        context_parallel_size=sizes.cp,
        expert_model_parallel_size=sizes.ep,
        expert_tensor_parallel_size=sizes.etp,
    )


def set_seeds(seed: int) -> None:
    """Megatron-LM's ``_set_random_seed``: a different seed per pipeline stage, then megatron's
    model-parallel RNG tracker (same across data parallel, different across tensor/expert parallel)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def is_writer() -> bool:
    """The rank that writes the run directory's files (rank 0; values are reduced to it first)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a single process started without torchrun, and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
