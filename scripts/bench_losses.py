#!/usr/bin/env python
"""Micro-benchmark of the four specialization losses: forward + backward time.

Each loss is timed against the memory-bound floor ``z * 1.0`` (one read + one write of z, timed
the same way), as medians over repeats; all methods of one shape are interleaved within each
repeat, so a noisy neighbour slows them alike. R_sp and L_o run on z [T, k, F] (L_o treats F as
H); R_cp and L_v on probs / gates [T, E] with E = --experts. ``sp_naive`` is the textbook autograd
R_sp (normalize z, then bmm), shown for comparison with the Gram-trick implementation.

    PYTHONPATH=. python scripts/bench_losses.py            # the default grid (~1-2 min on 2 cores)
    PYTHONPATH=. python scripts/bench_losses.py --quick    # a tiny run (smoke test)
    PYTHONPATH=. python scripts/bench_losses.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_moe_spec.losses import (  # noqa: E402
    coupling_loss,
    orthogonality_loss,
    specialization_loss,
    variance_loss,
)

DEFAULT_SHAPES = [(4096, 2, 256), (4096, 8, 256), (4096, 2, 1024), (4096, 8, 1024),
                  (16384, 2, 1024), (16384, 8, 256), (16384, 8, 1024)]
QUICK_SHAPES = [(256, 2, 32), (256, 4, 64)]
METHODS = ("floor", "specialization", "orthogonality", "coupling", "variance", "sp_naive")


def naive_specialization(z_TKF, valid_T):
    """Reference R_sp with plain autograd: normalized fp32 copy of z, then a batched product."""
    zn = torch.nn.functional.normalize(z_TKF.float(), dim=-1, eps=1e-6)
    cos = torch.bmm(zn, zn.transpose(1, 2))
    k = z_TKF.shape[1]
    per_t = (cos.square().sum((1, 2)) - torch.diagonal(cos, dim1=1, dim2=2).square().sum(1)) / (k * (k - 1))
    return (per_t * valid_T).sum() / valid_T.sum().clamp(min=1)


def make_case(T, k, F, E, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, k, F, generator=g).to(dtype).requires_grad_(True)
    logits = torch.randn(T, E, generator=g)
    probs = logits.softmax(-1).requires_grad_(True)
    nprobs = torch.randn(T, E, generator=g).softmax(-1).requires_grad_(True)
    idx = probs.detach().topk(k).indices
    nidx = nprobs.detach().topk(k).indices
    gates = torch.zeros(T, E).scatter(1, idx, probs.detach().gather(1, idx)).requires_grad_(True)
    valid = torch.rand(T, generator=g) > 0.05
    return dict(z=z, probs=probs, nprobs=nprobs, idx=idx, nidx=nidx, gates=gates, valid=valid)


def run_method(name, c):
    if name == "floor":
        with torch.no_grad():
            c["z"] * 1.0
        return
    if name == "specialization":
        out, leaves = specialization_loss(c["z"], c["valid"]), [c["z"]]
    elif name == "orthogonality":
        out, leaves = orthogonality_loss(c["z"], c["valid"]), [c["z"]]
    elif name == "coupling":
        out, leaves = coupling_loss(c["probs"], c["idx"], c["nprobs"], c["nidx"], c["valid"]), [c["probs"], c["nprobs"]]
    elif name == "variance":
        out, leaves = variance_loss(c["gates"], c["valid"]), [c["gates"]]
    elif name == "sp_naive":
        out, leaves = naive_specialization(c["z"], c["valid"]), [c["z"]]
    else:
        raise ValueError(name)
    out.backward()
    for leaf in leaves:
        leaf.grad = None


def bench_shape(T, k, F, E, dtype, repeats, naive_max_elements):
    c = make_case(T, k, F, E, dtype)
    methods = [m for m in METHODS if m != "sp_naive" or T * k * F <= naive_max_elements]
    times = {m: [] for m in methods}
    for m in methods:  # warm-up
        run_method(m, c)
    for _ in range(repeats):
        for m in methods:  # interleaved
            t0 = time.perf_counter()
            run_method(m, c)
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"T": T, "k": k, "F": F, "E": E, "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "repeats": repeats,
            "median_ms": {m: 1e3 * v for m, v in med.items()},
            "ratio_to_floor": {m: med[m] / med["floor"] for m in methods}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 7)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--naive-max-elements", type=int, default=1 << 23,
                    help="time sp_naive only when T*k*F <= this (it is slow; default 2^23)")
    ap.add_argument("--experts", type=int, default=64, help="E for R_cp and L_v (default 64)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' = stdout)")
    args = ap.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    repeats = args.repeats or (3 if args.quick else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, z dtype {args.dtype}, "
          f"E={args.experts}, median of {repeats} interleaved repeats, forward+backward; "
          f"floor = z * 1.0 (read+write of z, no grad)")
    head = f"{'T':>6} {'k':>2} {'F':>5} | {'floor ms':>9} | " + " | ".join(
        f"{m:>18}" for m in METHODS[1:])
    print(head)
    print("-" * len(head))
    results = []
    for T, k, F in shapes:
        r = bench_shape(T, k, F, args.experts, dtype, repeats, args.naive_max_elements)
        results.append(r)
        ms, ratio = r["median_ms"], r["ratio_to_floor"]
        cells = " | ".join(f"{ms[m]:8.2f} ({ratio[m]:5.1f}x)" if m in ms else f"{'-':>18}"
                           for m in METHODS[1:])
        print(f"{T:>6} {k:>2} {F:>5} | {ms['floor']:9.2f} | {cells}", flush=True)
    print("cells: median ms (ratio to floor); '-' = not timed (sp_naive above --naive-max-elements)")
    if args.json:
        text = json.dumps(results, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return results


if __name__ == "__main__":
    main()
