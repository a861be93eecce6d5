"""Comparing a parallel run's results with a one-process run's."""
from __future__ import annotations

from typing import Dict, List

import torch


def tensor_mismatches(reference: Dict[str, torch.Tensor], actual: Dict[str, torch.Tensor],
                      rtol: float = 1e-5, atol: float = 1e-12) -> List[str]:
    """Keys whose tensors differ by more than ``rtol`` relative to the reference's largest entry
    (plus ``atol``).

    The tolerance is relative to each tensor's max-abs value (not element-wise), so entries that are
    near zero only by cancellation do not produce spurious failures, while any real error (a wrong
    reduction, a missing shard, a factor of 2) stands out by orders of magnitude.
    """
    problems = []
    for key in sorted(set(reference) | set(actual)):
        if key not in actual:
            problems.append(f"{key}: missing")
            continue
        if key not in reference:
            problems.append(f"{key}: unexpected")
            continue
        ref, got = reference[key].double(), actual[key].double()
        if ref.shape != got.shape:
            problems.append(f"{key}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
            continue
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        err = float((ref - got).abs().max()) if ref.numel() else 0.0
        if err > rtol * scale + atol:
            problems.append(f"{key}: max|diff| {err:.3e} > {rtol:g} * max|ref| {scale:.3e}")
    return problems


def assert_same_step(reference: dict, actual: dict, rtol: float = 1e-5) -> None:
    """The LM loss and every full gradient agree to ``rtol``."""
    ref_loss, loss = reference["lm_loss"], actual["lm_loss"]
    assert abs(loss - ref_loss) <= rtol * abs(ref_loss), f"lm_loss {loss!r} != {ref_loss!r}"
    problems = tensor_mismatches(reference["grads"], actual["grads"], rtol)
    assert not problems, "gradients differ from the one-process run:\n  " + "\n  ".join(problems)


def spec_structure(spec):
    """A megatron module spec as plain, comparable data: ``ModuleSpec`` / submodule dataclasses as
    ``(type, {field: ...})``, ``functools.partial`` as ``("partial", func, args, {keyword: ...})``.

    From megatron-core 0.18 the MoE layer is specced as ``functools.partial(MoELayer, ...)``, and two
    partials of the same function and arguments are not ``==`` (partial compares by identity): two
    builds of the same spec compare equal only through this.
    """
    import dataclasses
    import functools

    if isinstance(spec, functools.partial):
        return ("partial", spec.func, tuple(spec_structure(a) for a in spec.args),
                {k: spec_structure(v) for k, v in spec.keywords.items()})
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return (type(spec), {f.name: spec_structure(getattr(spec, f.name)) for f in dataclasses.fields(spec)})
    if isinstance(spec, (list, tuple)):
        return type(spec)(spec_structure(s) for s in spec)
    if isinstance(spec, dict):
        return {k: spec_structure(v) for k, v in spec.items()}
    return spec
