"""An explicit CPU / gloo backend for megatron-core, for the tests and the CPU demo.

megatron-core assumes CUDA in many small places. This module patches exactly those places so that
megatron-core's own MoE code (router, experts, token dispatchers, pipeline schedules, DDP, optimizer)
runs unchanged on CPU with gloo, one process per rank. It is

- **explicit**: nothing happens on import; call :func:`enable` (the tests and the CPU demo do);
- **CPU only**: :func:`enable` refuses to do anything when CUDA is available, so Megatron's behaviour
  on a GPU machine never changes;
- **reversible**: :func:`disable` restores every patched attribute (used by the tests of this module);
- **version-guarded**: each patch names the megatron-core versions it was checked against and checks
  that the attribute it replaces exists, failing loudly (not silently) on a version that moved it.

The patches, each with its reason (see also docs/cpu_backend.md):

1. ``torch.cuda`` device look-ups, streams, events, synchronize, RNG: CPU equivalents / no-ops.
2. megatron's CUDA RNG tracker: forks the CPU generator instead (dropout, init under TP/EP regions).
3. literal ``device="cuda"`` tensors (schedules, causal masks, optimizer, clip_grads, ...): those
   modules see a ``torch`` whose factory functions map ``"cuda"`` to CPU; ``Tensor.cuda()`` is the
   identity.
4. ``moe_utils.te_general_gemm`` is undefined without Transformer Engine (NameError in the router's
   gating linear): defined as None, which selects megatron's own torch.mm path.
5. ``maybe_move_tensor_to_cpu`` (alltoall dispatcher) ignores ``as_numpy`` for CPU tensors, so split
   sizes reach ``all_to_all_single`` as tensors (TypeError): honour ``as_numpy`` on CPU.
6. ``WrappedTorchNorm`` (the norm used without TE) refuses sequence parallelism, while MoE with TP>1
   requires it: allow it and mark the norm's parameters ``sequence_parallel`` so that
   ``finalize_model_grads`` all-reduces their gradients over TP, exactly as TE's norms are treated.
7. gloo has no uneven list all-gather: ``tensor_parallel.mappings`` gathers / reduce-scatters with
   uneven split sizes by padding to the largest split and using the even tensor collectives.
8. ``torch.compile`` of megatron's small fusion kernels (``jit_fuser``) is disabled: on CPU, inductor
   compile time dominates a tiny model and needs nothing it would gain.
9. gloo mis-pairs megatron's *batched* pipeline p2p (``batch_isend_irecv``) when both pipeline
   directions connect the same two ranks (pp=2 with interleaving): same-shaped activations and
   gradients are swapped from the third micro-batch on. Batched p2p goes through megatron's own
   unbatched, even/odd-ordered path instead.
10. ``clip_grad_by_total_norm_fp32`` asserts that every gradient is a ``torch.cuda.FloatTensor``
    (gradient clipping, ``clip_grad > 0``, in the optimizer step): the same scaling, checking for
    fp32 instead of the CUDA type.
"""
from __future__ import annotations

import contextlib
import logging
import types
from typing import Any, Callable, List, Tuple

import torch

logger = logging.getLogger(__name__)

CHECKED_MEGATRON_CORE_VERSIONS = ("0.16", "0.19")
"""megatron-core minor versions on which every patch below was run (0.16.1 and 0.19.2 in CI)."""

_CPU = torch.device("cpu")
_saved: List[Tuple[Any, str, Any, bool]] = []  # (owner, attribute, original, existed)
_enabled = False


# ----------------------------------------------------------------------------- public API
def enable(force: bool = False) -> bool:
    """Activate the CPU backend. Idempotent.

    Returns True when the backend is active after the call, False when CUDA is available (then
    nothing is patched: on a GPU machine megatron-core runs as it is). ``force=True`` activates it
    even with CUDA present (only for debugging the backend itself).
    """
    global _enabled
    if _enabled:
        return True
    if torch.cuda.is_available() and not force:
        logger.info("CUDA is available: the megatron-moe-spec CPU backend stays off")
        return False
    _check_megatron_version()
    try:
        _patch_torch_cuda()
        _patch_rng_tracker()
        _patch_cuda_literals()
        _patch_te_general_gemm()
        _patch_maybe_move_tensor_to_cpu()
        _patch_wrapped_torch_norm()
        _patch_uneven_collectives()
        _patch_jit_fuser()
        _patch_batched_p2p()
        _patch_clip_grads()
    except Exception:
        _restore_all()
        raise
    _enabled = True
    return True


def disable() -> None:
    """Undo every patch (restores the original attributes)."""
    global _enabled
    _restore_all()
    _enabled = False


def is_enabled() -> bool:
    return _enabled


# ----------------------------------------------------------------------------- helpers
def _set(owner: Any, name: str, value: Any) -> None:
    """Replace ``owner.name`` with ``value`` and remember the original for :func:`disable`."""
    existed = hasattr(owner, name)
    _saved.append((owner, name, getattr(owner, name, None), existed))
    setattr(owner, name, value)


def _restore_all() -> None:
    while _saved:
        owner, name, original, existed = _saved.pop()
        if existed:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def _require(owner: Any, name: str) -> Any:
    """The attribute a patch replaces; a clear error when this megatron-core version moved it."""
    if not hasattr(owner, name):
        raise RuntimeError(
            f"megatron_moe_spec.cpu: {getattr(owner, '__name__', owner)}.{name} not found; this "
            f"megatron-core version is not supported by the CPU backend (checked: "
            f"{', '.join(CHECKED_MEGATRON_CORE_VERSIONS)})"
        )
    return getattr(owner, name)


def _check_megatron_version() -> None:
    from megatron.core import package_info
    from packaging.version import Version

    version = Version(package_info.__version__)
    minor = f"{version.major}.{version.minor}"
    if minor not in CHECKED_MEGATRON_CORE_VERSIONS:
        logger.warning(
            "megatron_moe_spec.cpu: megatron-core %s was not checked with the CPU backend "
            "(checked: %s); patches that no longer apply will raise",
            version,
            ", ".join(CHECKED_MEGATRON_CORE_VERSIONS),
        )


# ----------------------------------------------------------------------------- 1. torch.cuda
class _CpuStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is synchronous, so waiting is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuEvent:
    """Stands in for ``torch.cuda.Event``."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


_DEFAULT_STREAM = _CpuStream()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    replacements = {
        # megatron passes current_device() as a tensor's device: the CPU device.
        "current_device": lambda: _CPU,
        "synchronize": lambda device=None: None,
        "Stream": _CpuStream,
        "Event": _CpuEvent,
        "current_stream": lambda device=None: _DEFAULT_STREAM,
        "default_stream": lambda device=None: _DEFAULT_STREAM,
        "stream": lambda stream=None: contextlib.nullcontext(),
        "empty_cache": lambda: None,
        # The "CUDA" generator is the CPU generator: megatron seeds it, saves and restores it.
        "manual_seed": lambda seed: torch.manual_seed(seed),
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda state, device="cuda": torch.set_rng_state(state),
        "memory_allocated": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None,
    }
    for name, value in replacements.items():
        _require(cuda, name)
        _set(cuda, name, value)
    # torch.cuda.nvtx ranges are no-ops without CUDA.
    _set(cuda, "nvtx", types.SimpleNamespace(range_push=lambda *a, **k: None,
                                              range_pop=lambda *a, **k: None,
                                              range=lambda *a, **k: contextlib.nullcontext(),
                                              mark=lambda *a, **k: None))


# ----------------------------------------------------------------------------- 2. RNG tracker
def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    base = _require(mrandom, "CudaRNGStatesTracker")

    class CpuRNGStatesTracker(base):
        """megatron's tracker of named RNG states, over the CPU generator.

        ``fork(name)`` swaps the CPU generator's state for the named one and back, exactly as the
        CUDA tracker swaps the CUDA generator's. (The CUDA tracker also warns when the CPU state
        changes inside a fork; here the CPU state *is* the forked state, so that check is dropped.)
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            original = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = original
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    original = self.states_[outer_name]
                torch.set_rng_state(original)
                self._current_state_name = outer_name

    _set(mrandom, "CudaRNGStatesTracker", CpuRNGStatesTracker)
    _require(mrandom, "_get_cuda_rng_state")
    _require(mrandom, "_set_cuda_rng_state")
    _set(mrandom, "_get_cuda_rng_state", lambda device="cuda", clone=False, graph_safe=False:
         torch.get_rng_state())
    _set(mrandom, "_set_cuda_rng_state", lambda new_state, device=-1, graph_safe=False:
         torch.set_rng_state(new_state))
    # A tracker created before enable() (a CUDA one) must be rebuilt as a CPU one.
    _set(mrandom, "_CUDA_RNG_STATE_TRACKER", None)
    _set(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False)


# ----------------------------------------------------------------------------- 3. "cuda" literals
class _TorchOnCpu:
    """``torch`` as seen by one megatron module, with ``device="cuda"`` in factory calls made CPU.

    Only the modules that build tensors with a literal ``device="cuda"`` get this view; everything
    else is the real ``torch`` (attribute look-ups fall through).
    """

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

    def __init__(self, real_torch):
        self._torch = real_torch

    def __getattr__(self, name):
        value = getattr(self._torch, name)
        if name in self._FACTORIES:
            return _on_cpu(value)
        return value


def _on_cpu(factory: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = _CPU
        return factory(*args, **kwargs)

    return wrapped


# Modules that build tensors with a literal device="cuda" (megatron-core 0.15/0.16), on the paths
# the training loop uses.
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.utils",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)


def _patch_cuda_literals() -> None:
    import importlib

    view = _TorchOnCpu(torch)
    for name in _MODULES_WITH_CUDA_LITERALS:
        module = importlib.import_module(name)
        _require(module, "torch")
        _set(module, "torch", view)
    # Tensor.cuda() can only raise without CUDA; on the CPU backend it keeps the tensor where it is.
    _set(torch.Tensor, "cuda", lambda self, device=None, non_blocking=False, **kwargs: self)


# ----------------------------------------------------------------------------- 4. te_general_gemm
def _patch_te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        _set(moe_utils, "te_general_gemm", None)


# ----------------------------------------------------------------------------- 5. split sizes
def _cpu_maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's ``maybe_move_tensor_to_cpu``, honouring ``as_numpy`` for tensors already on CPU."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy()
    return tensor


def _patch_maybe_move_tensor_to_cpu() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    _require(moe_utils, "maybe_move_tensor_to_cpu")
    _set(moe_utils, "maybe_move_tensor_to_cpu", _cpu_maybe_move_tensor_to_cpu)
    # token_dispatcher imports it by name.
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        _set(token_dispatcher, "maybe_move_tensor_to_cpu", _cpu_maybe_move_tensor_to_cpu)


# ----------------------------------------------------------------------------- 6. norm under SP
def _patch_wrapped_torch_norm() -> None:
    from megatron.core.transformer import torch_norm

    cls = _require(torch_norm, "WrappedTorchNorm")
    original_new = cls.__new__

    def __new__(klass, config, hidden_size, eps=1e-5, **kwargs):
        sequence_parallel = config.sequence_parallel
        if sequence_parallel:
            # The original asserts on config.sequence_parallel: hand it a copy without it.
            import copy

            config = copy.copy(config)
            config.sequence_parallel = False
        norm = original_new(klass, config, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            # Replicated over TP with per-rank partial grads: finalize_model_grads sums them.
            setattr(param, "sequence_parallel", sequence_parallel)
        return norm

    _set(cls, "__new__", __new__)


# ----------------------------------------------------------------------------- 7. uneven gathers
def _gather_along_first_dim_cpu(input_, group, output_split_sizes=None, use_global_buffer=False):
    """All-gather along dim 0; uneven ``output_split_sizes`` by padding (gloo lacks uneven lists)."""
    world_size = group.size()
    if world_size == 1:
        return input_
    input_ = input_.contiguous()
    if output_split_sizes is None:
        output = input_.new_empty((input_.shape[0] * world_size, *input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(output, input_, group=group)
        return output
    longest = max(output_split_sizes)
    padded = input_.new_zeros((longest, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    gathered = input_.new_empty((longest * world_size, *input_.shape[1:]))
    torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
    pieces = [gathered[r * longest : r * longest + n] for r, n in enumerate(output_split_sizes)]
    return torch.cat(pieces, dim=0)


def _reduce_scatter_along_first_dim_cpu(input_, group, input_split_sizes=None, use_global_buffer=False):
    """Reduce-scatter along dim 0; uneven ``input_split_sizes`` by padding every split."""
    world_size = group.size()
    if world_size == 1:
        return input_
    input_ = input_.contiguous()
    if input_split_sizes is None:
        assert input_.shape[0] % world_size == 0, (
            "First dimension of the tensor should be divisible by tensor parallel size"
        )
        output = input_.new_empty((input_.shape[0] // world_size, *input_.shape[1:]))
        torch.distributed.reduce_scatter_tensor(output, input_, group=group)
        return output
    longest = max(input_split_sizes)
    padded = input_.new_zeros((longest * world_size, *input_.shape[1:]))
    for r, piece in enumerate(torch.split(input_, input_split_sizes, dim=0)):
        padded[r * longest : r * longest + piece.shape[0]] = piece
    output = input_.new_empty((longest, *input_.shape[1:]))
    torch.distributed.reduce_scatter_tensor(output, padded, group=group)
    return output[: input_split_sizes[group.rank()]]


def _patch_uneven_collectives() -> None:
    from megatron.core.tensor_parallel import mappings

    _require(mappings, "_gather_along_first_dim")
    _require(mappings, "_reduce_scatter_along_first_dim")
    _set(mappings, "_gather_along_first_dim", _gather_along_first_dim_cpu)
    _set(mappings, "_reduce_scatter_along_first_dim", _reduce_scatter_along_first_dim_cpu)


# ----------------------------------------------------------------------------- 8. torch.compile
def _patch_jit_fuser() -> None:
    import torch._dynamo

    # Functions megatron decorated with torch.compile at import time run eagerly.
    _set(torch._dynamo.config, "disable", True)
    from megatron.core import jit

    _set(jit, "jit_fuser", jit.noop_decorator)


# ----------------------------------------------------------------------------- 9. batched p2p
def _patch_batched_p2p() -> None:
    from megatron.core.pipeline_parallel import p2p_communication

    unbatched = _require(p2p_communication, "_p2p_ops")
    _require(p2p_communication, "_batched_p2p_ops")

    def batched_as_unbatched(**kwargs):
        # Same operations, megatron's even/odd ordering, returned as the list the caller expects.
        return list(unbatched(**kwargs).values())

    _set(p2p_communication, "_batched_p2p_ops", batched_as_unbatched)
# ----------------------------------------------------------------------------- 9. clip grads
def _clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's ``clip_grad_by_total_norm_fp32`` without its CUDA tensor-type assertion."""
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            assert grad.dtype in ((torch.float32, torch.bfloat16) if use_decoupled_grad else (torch.float32,))
            grads.append(to_local_if_dtensor(grad).detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_clip_grads() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    for module in (clip_grads, optimizer):
        _require(module, "clip_grad_by_total_norm_fp32")
        _set(module, "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32_cpu)


def cpu_model_config_overrides() -> dict:
    """TransformerConfig settings megatron-core needs on CPU without Transformer Engine.

    Fused kernels (bias-activation, masked softmax, gradient-accumulation fusion) need CUDA or
    apex; CPU initialization makes weights independent of the parallel layout (the full master
    weight is drawn with the CPU generator and then sliced), which the parity tests rely on.
    """
    return dict(
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
    )
