"""Checkpoints through megatron-core distributed checkpointing, written atomically; resume.

Layout (docs/design.md): ``RUN_DIR/checkpoints/iter_XXXXXXX/`` (a megatron-core distributed checkpoint)
and ``RUN_DIR/checkpoints/latest`` (text: the last complete iteration).

What is saved: the model's ``sharded_state_dict`` (each chunk; ``model`` or ``model0``, ``model1``...
as Megatron-LM names them), the optimizer's sharded state dict (built from the model's), the lr
scheduler's state, the iteration, ``consumed_train_samples`` (the data position, see ``data.py``), the
world size, and every rank's RNG states (python, numpy, torch, megatron's model-parallel tracker) as a
``ShardedObject`` per rank.

Atomicity: all ranks save into ``iter_XXXXXXX.tmp``; after a barrier rank 0 renames it to
``iter_XXXXXXX`` and only then replaces ``latest`` (written to a temporary file, fsynced, then
``os.replace``). A crash at any point leaves the previous checkpoint and ``latest`` untouched; a
leftover ``.tmp`` is removed by the next save of that iteration and never read.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Optional

import numpy
import torch

from megatron_moe_spec.training.distributed import barrier, is_writer

LATEST = "latest"


def checkpoints_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest(root: str) -> Optional[int]:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return int(f.read().strip())


def resolve_resume(cfg) -> Optional[str]:
    """The checkpoint directory to resume from, or None (``checkpoint.resume``: auto | none | path)."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoints_root(cfg.logging.run_dir)
        it = read_latest(root)
        return iteration_dir(root, it) if it is not None else None
    if os.path.isfile(os.path.join(resume, LATEST)):  # a checkpoints/ folder: its latest
        return iteration_dir(resume, read_latest(resume))
    return resume


# ----------------------------------------------------------------------------- state dicts
def _metadata(cfg) -> dict:
    # Megatron-LM's defaults for its own checkpoints.
    meta = {"chained_optim_avoid_prefix": True}
    if cfg.training.use_distributed_optimizer:
        meta["distrib_optim_sharding_type"] = "fully_reshardable"
    return meta


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def sharded_state_dict(cfg, model_chunks, optimizer, scheduler, iteration: int, consumed_samples: int,
                       is_loading: bool, with_rng: bool = True) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    n = len(model_chunks)
    state = {_model_key(i, n): _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model_chunks)}
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=_metadata(cfg))
    state["opt_param_scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    state["consumed_train_samples"] = consumed_samples
    state["world_size"] = torch.distributed.get_world_size()
    if with_rng:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        state["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return state


def _unwrap(chunk):
    from megatron_moe_spec.training.model import unwrap

    return unwrap(chunk)


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"random": random.getstate(), "numpy": numpy.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- save
def save_checkpoint(cfg, model_chunks, optimizer, scheduler, iteration: int, consumed_samples: int) -> str:
    """Save iteration ``iteration`` atomically (a collective: every rank). Returns the directory."""
    from megatron.core import dist_checkpointing

    root = checkpoints_root(cfg.logging.run_dir)
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if is_writer():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    state = sharded_state_dict(cfg, model_chunks, optimizer, scheduler, iteration, consumed_samples,
                               is_loading=False)
    dist_checkpointing.save(state, tmp, sharded_strategy=_save_strategy())
    barrier()
    if is_writer():
        old = final + ".old"
        if os.path.isdir(final):  # re-saving an iteration (e.g. after a resume): swap, then delete
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        _write_latest(root, iteration)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _save_strategy():
    """megatron-core's default (torch_dist) with one writer process per rank.

    Its writer processes measure their memory with psutil for a debug log line, and fail (and hang
    the save) when psutil is missing, which megatron-core does not require: then the measurement
    reads 0. Nothing else changes.
    """
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not getattr(filesystem_async, "HAVE_PSUTIL", True):
        filesystem_async._process_memory = lambda: 0
    strategy = get_default_save_sharded_strategy("torch_dist")
    strategy.thread_count = 1
    return strategy


def _write_latest(root: str, iteration: int) -> None:
    path = os.path.join(root, LATEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename durable
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ----------------------------------------------------------------------------- load
def load_checkpoint(cfg, ckpt_dir: str, model_chunks, optimizer, scheduler):
    """Load ``ckpt_dir`` into the model, optimizer and scheduler. Returns (iteration, consumed_samples).

    RNG states are restored when the checkpoint was written by the same number of processes.
    """
    from megatron.core import dist_checkpointing

    if not os.path.isdir(ckpt_dir) or not dist_checkpointing.check_is_distributed_checkpoint(ckpt_dir):
        from megatron_moe_spec.run_config import ConfigError

        raise ConfigError(f"checkpoint.resume: {ckpt_dir} is not a megatron-core distributed checkpoint; "
                          f"pass a checkpoints/iter_XXXXXXX folder, or auto / none", key="checkpoint.resume")
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    same_world = common.get("world_size") == torch.distributed.get_world_size()
    state = sharded_state_dict(cfg, model_chunks, optimizer, scheduler, 0, 0, is_loading=True,
                               with_rng=same_world)
    loaded = dist_checkpointing.load(state, ckpt_dir)
    n = len(model_chunks)
    for i, chunk in enumerate(model_chunks):
        result = _unwrap(chunk).load_state_dict(loaded[_model_key(i, n)], strict=False)
        # Local (non-TE) linear layers save an empty _extra_state that their state_dict lacks.
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if same_world:
        rng = loaded["rng_state"]
        _set_rng_state(rng if isinstance(rng, dict) else rng[0])
    return int(loaded["iteration"]), int(loaded["consumed_train_samples"])
