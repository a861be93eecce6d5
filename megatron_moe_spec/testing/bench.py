"""Measuring helpers shared by the benchmark scripts (scripts/bench_exchange.py, scripts/bench_overhead.py).

- :func:`count_collectives`: patch torch.distributed's collectives to add each call's payload bytes to a dict.
- :class:`SavedTensorMeter`: the bytes autograd keeps saved for backward (peak of the live total, once per storage).
- :func:`static_training_bytes`: parameters, gradient buffers and optimizer state of a model (unique storages).
- :func:`budgeted_spec_config`: a variant's SpecializationConfig, a token ``budget`` b as sp_max_tokens = tokens // b.
- :func:`wide_shapes`: the realistic-width model shapes, one per expert family, and their --quick sizes.
"""
from __future__ import annotations

import weakref
from typing import Dict, Iterable, Optional, Set, Tuple

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


class _Packed:
    """What autograd holds for one saved tensor while the meter is on; its death = the entry freed."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorMeter:
    """The bytes autograd keeps saved for backward inside the ``with`` block: their peak and total.

    A storage counts once however many saved tensors (views) refer to it, at its full size, from the
    first save until the last saved entry referring to it is freed (after the backward that used it,
    or when its graph is dropped). ``peak_bytes`` is the largest such live total over the block
    (with one micro-batch: at the end of the forward pass, where training memory peaks);
    ``total_bytes`` counts every storage ever saved. ``exclude`` storages (e.g. parameters: static
    memory, counted elsewhere) are skipped. Not seen: tensors kept outside autograd's saved-tensor
    mechanism (e.g. attributes of a custom Function's ``ctx``), and transient buffers within an op.
    """

    def __init__(self, exclude: Optional[Iterable[torch.Tensor]] = None):
        self._exclude: Set = {_storage_key(t)[0] for t in (exclude or ())}
        self._live: Dict = {}  # storage key -> [nbytes, live saved entries]
        self._current = 0
        self.peak_bytes = 0
        self.total_bytes = 0
        self.storages = 0
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        if t.layout != torch.strided or t.device.type == "meta":
            return t
        key, nbytes = _storage_key(t)
        if key in self._exclude:
            return t
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = [nbytes, 0]
            self._current += nbytes
            self.total_bytes += nbytes
            self.storages += 1
            self.peak_bytes = max(self.peak_bytes, self._current)
        entry[1] += 1
        # detach(): the same storage without autograd history. Holding ``t`` itself would tie a saved
        # output to its own grad_fn (a cycle through C++ that Python's gc cannot break: a dropped
        # graph would never be released). torch's own save_on_cpu hook likewise unpacks a plain tensor.
        packed = _Packed(t.detach())
        weakref.finalize(packed, self._release, key)
        return packed

    def _release(self, key):
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._live[key]
            self._current -= entry[0]

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed

    @property
    def live_bytes(self) -> int:
        return self._current

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._hooks = None
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


def budgeted_spec_config(values: dict, tokens: int):
    """The ``SpecializationConfig`` of a benchmark variant (``values``: its fields, plus an optional
    ``budget`` b: R_sp / L_o on 1/b of the micro-batch's ``tokens``, i.e. sp_max_tokens = tokens // b)."""
    from megatron_moe_spec.specialization_config import SpecializationConfig

    values = dict(values)
    budget = values.pop("budget", None)
    if budget is not None:
        values["sp_max_tokens"] = max(1, tokens // budget)
    return SpecializationConfig(**values)


def wide_shapes(num_layers: int, suffix: str = "") -> Tuple[Dict[str, dict], Dict[str, dict]]:
    """The realistic widths (TinyGPTSettings fields; H = 1024, 2048 tokens per micro-batch), one shape per
    expert family, named ``<family><suffix>``: Mixtral-like F/H = 3.5 top-2 of 8, OLMoE-like F/H = 0.5 top-8
    of 64, DeepSeek-like F/H = 0.25 top-8 of 64 + a shared expert; ``num_layers`` layers each. Returns
    (the shapes, their --quick sizes: H = 128, 128 tokens a sequence, 16 experts where there were 64)."""
    wide = dict(num_layers=num_layers, hidden_size=1024, num_attention_heads=8, ffn_hidden_size=4096,
                seq_length=1024, micro_batch_size=2, vocab_size=1024)
    shapes = {
        "mixtral": dict(wide, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=3584),
        "olmoe": dict(wide, num_moe_experts=64, moe_router_topk=8, moe_ffn_hidden_size=512),
        "deepseek": dict(wide, num_moe_experts=64, moe_router_topk=8, moe_ffn_hidden_size=256,
                         moe_shared_expert_intermediate_size=512),
    }
    narrow = dict(hidden_size=128, num_attention_heads=4, ffn_hidden_size=256, seq_length=128, vocab_size=256)
    quick = {
        "mixtral": dict(shapes["mixtral"], **narrow, moe_ffn_hidden_size=448),
        "olmoe": dict(shapes["olmoe"], **narrow, num_moe_experts=16, moe_ffn_hidden_size=64),
        "deepseek": dict(shapes["deepseek"], **narrow, num_moe_experts=16, moe_ffn_hidden_size=32,
                         moe_shared_expert_intermediate_size=64),
    }
    return ({name + suffix: v for name, v in shapes.items()}, {name + suffix: v for name, v in quick.items()})
