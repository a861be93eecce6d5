"""Measuring helpers shared by the benchmark scripts (scripts/bench_exchange.py, scripts/bench_overhead.py).

- :func:`count_collectives`: patch torch.distributed's collectives to add each call's payload bytes to a dict.
- :class:`SavedTensorMeter`: the bytes autograd saves for backward during a forward, counted once per storage.
- :func:`static_training_bytes`: parameters, gradient buffers and optimizer state of a model (unique storages).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Set

import torch


def count_collectives() -> Dict[str, int]:
    """Patch torch.distributed's collectives in this process to add their payload bytes to a dict."""
    import torch.distributed as dist

    counts = {"all_to_all": 0, "all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}

    def wrap(name, key, tensor_arg):
        original = getattr(dist, name)

        def counted(*args, **kwargs):
            tensor = args[tensor_arg] if len(args) > tensor_arg else None
            if tensor is not None and hasattr(tensor, "numel"):
                counts[key] += tensor.numel() * tensor.element_size()
            return original(*args, **kwargs)

        setattr(dist, name, counted)

    wrap("all_to_all_single", "all_to_all", 1)       # (output, input, ...): bytes sent
    wrap("all_gather_into_tensor", "all_gather", 1)  # (output, input): bytes contributed
    wrap("reduce_scatter_tensor", "reduce_scatter", 1)
    wrap("all_reduce", "all_reduce", 0)
    return counts


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr()), s.nbytes()


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward inside the ``with`` block.

    Counted once per underlying storage (views of one buffer count once, at the storage's full
    size), skipping ``exclude`` storages (e.g. parameters: static memory, counted elsewhere).
    Every saved tensor stays alive until the backward that uses it, so with one micro-batch the
    sum is the activation memory alive at the end of the forward pass (a graph dropped before its
    backward, if any, would still be counted: an over-estimate). Not seen: tensors kept
    outside autograd's saved-tensor mechanism (e.g. attributes of a custom Function's ``ctx``),
    and transient buffers freed within an op.
    """

    def __init__(self, exclude: Optional[Iterable[torch.Tensor]] = None):
        self._exclude: Set = {_storage_key(t)[0] for t in (exclude or ())}
        self._seen: Dict = {}
        self._held: list = []
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        if t.layout == torch.strided and t.device.type != "meta":
            key, nbytes = _storage_key(t)
            if key not in self._exclude and key not in self._seen:
                self._seen[key] = nbytes
                # Hold the storage until the meter closes: were it freed early (a graph dropped before
                # its backward), a later storage at the same address would be missed.
                self._held.append(t.untyped_storage())
        return t

    @staticmethod
    def _unpack(t):
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @property
    def storages(self) -> int:
        return len(self._seen)

    def __enter__(self):
        self._seen.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._held.clear()
        return False


def static_training_bytes(parameters: Iterable[torch.Tensor], optimizer=None) -> Dict[str, int]:
    """Unique-storage bytes of parameters, their gradient buffers (``main_grad`` / ``grad``) and
    the optimizer's state tensors."""
    params = list(parameters)

    def unique_bytes(tensors) -> int:
        seen = {}
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                key, nbytes = _storage_key(t)
                seen[key] = nbytes
        return sum(seen.values())

    grads = [getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad
             for p in params]
    state = []
    if optimizer is not None:
        for s in optimizer.state.values():
            state.extend(v for v in s.values() if isinstance(v, torch.Tensor))
    return {"params": unique_bytes(params), "grads": unique_bytes(g for g in grads if g is not None),
            "optimizer_state": unique_bytes(state)}
