#!/usr/bin/env python
"""What the specialization losses cost in training step time and memory (issue 6).

For each model shape and parallel mode, one run builds every variant's model side by side (identical
weights), then times full training steps interleaved across variants (v1, v2, ..., v2, v3, ..., v1; the
order rotates every round), so a
noisy neighbour slows every variant alike. A training step is megatron's forward/backward schedule +
DDP + finalize_model_grads, an AdamW step, and (``lb_metrics``) the metrics' log-time reduction. The
optimizer runs with lr = 0: it does all its work, but every variant keeps identical weights and
routing over the measured steps (checked: every variant's LM loss is equal at every step).

Variants (megatron's load-balancing loss, 1e-2, is always on; ``lb`` is stock megatron-core):
    lb, lb_sp (R_sp 2e-3), lb_cp (R_cp 1e-3), lb_o (L_o 2e-3), lb_v (L_v 1e-3), lb_sp_cp, all (sp+cp+o+v),
    lb_metrics (routing metrics on every step, all coefficients 0), lb_again (a second lb: the A/A control)

Time: median step time per variant after warm-up steps; ``step_time_ratio`` = median / median of ``lb``
(wall clock, rank 0), with the quartiles of the per-round ratios. ``cpu_time_ratio``: the same with the
CPU seconds the step's processes consumed (``time.process_time``, summed over the ranks), which leaves
out the time a process waits for a core held by another job (2 shared cores here: the quieter number).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one step (reset before it). On CPU there is no
allocator counter, so we measure a *model* of peak training memory: static bytes (parameters, DDP's
fp32 gradient buffer, AdamW state; identical across variants) + the peak over the step of the bytes
autograd holds saved for backward (unique storages, parameters excluded, each from its save until its
backward or until its graph is dropped; with one micro-batch the peak is at the end of the forward, where
training memory peaks). ``peak_mem_ratio`` is that total over ``lb``'s;
``saved_bytes_ratio`` the activation part alone. Not seen on CPU: transient buffers inside an op and
allocator fragmentation/caching. Under EP the larger of the two ranks is reported.

    PYTHONPATH=. python scripts/bench_overhead.py --json out.json   # both shapes, all modes (~10 min, 2 cores)
    PYTHONPATH=. python scripts/bench_overhead.py --quick           # tiny smoke run (single process, < 1 min)
    PYTHONPATH=. python scripts/bench_overhead.py --shapes deepseek --modes ep2_allgather
    PYTHONPATH=. python scripts/bench_overhead.py --shapes mixtral_wide olmoe_wide deepseek_wide \
        --modes single ep2 --json wide.json --resume   # the realistic widths, with sp_max_tokens budgets
    PYTHONPATH=. python scripts/bench_overhead.py --quick --shapes mixtral_wide olmoe_wide deepseek_wide --modes single ep2

Budget variants (``lb_sp_b4``, ``lb_sp_cp_b16``, ...): R_sp with ``sp_max_tokens`` = 1/4 or 1/16 of a
micro-batch's tokens (the default variants of the wide shapes, with lb, lb_sp, lb_sp_cp and lb_again).
``--resume`` keeps the (shape, mode) entries already in ``--json``; the file is written after each entry.

``--profile``: one more step per variant under ``torch.profiler`` (rank 0's is reported). The time spent in
megatron-moe-spec's named ranges and backward nodes (``megatron_moe_spec.core.profiling``) is taken as a
share s of the *same* profiled step, so it drifts less with the machine's load than a ratio of two steps
(not immune: memory-bound copies suffer more from a neighbour's load than matmuls); 1 / (1 - s) is the
step-time ratio it implies. Both are lower bounds: the backward of our plain ops
is not attributed. On CUDA the kernels launched in a range are also summed (``ours_device_s``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_moe_spec.testing.bench import wide_shapes  # noqa: E402

LB = 1e-2
VARIANTS = {
    "lb": {},
    "lb_sp": {"sp_coeff": 2e-3},
    "lb_cp": {"cp_coeff": 1e-3},
    "lb_o": {"ortho_coeff": 2e-3},
    "lb_v": {"var_coeff": 1e-3},
    "lb_sp_cp": {"sp_coeff": 2e-3, "cp_coeff": 1e-3},
    "all": {"sp_coeff": 2e-3, "cp_coeff": 1e-3, "ortho_coeff": 2e-3, "var_coeff": 1e-3},
    "lb_metrics": {"metrics": True},
    "lb_again": {},  # a second copy of the baseline: the A/A control, its ratio is the noise floor
}
# sp_max_tokens variants ("budget": sp_max_tokens = tokens of a micro-batch // budget); chosen by
# --variants, and by default for the wide shapes.
BUDGET_VARIANTS = {
    "lb_sp_b4": {"sp_coeff": 2e-3, "budget": 4},
    "lb_sp_b16": {"sp_coeff": 2e-3, "budget": 16},
    "lb_sp_cp_b4": {"sp_coeff": 2e-3, "cp_coeff": 1e-3, "budget": 4},
    "lb_sp_cp_b16": {"sp_coeff": 2e-3, "cp_coeff": 1e-3, "budget": 16},
}
ALL_VARIANTS = {**VARIANTS, **BUDGET_VARIANTS}
WIDE_DEFAULT_VARIANTS = ["lb", "lb_sp", "lb_sp_cp", "lb_sp_b4", "lb_sp_b16", "lb_sp_cp_b4", "lb_sp_cp_b16",
                         "lb_again"]

# Shapes: TinyGPTSettings fields. "vanilla": 8 full-size experts, top-2, softmax. "deepseek": fine-grained
# experts (F = H/2) + shared experts, top-4 of 32, z-loss on (in every variant, the baseline included).
SHAPES = {
    "vanilla": dict(num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512,
                    num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=512,
                    seq_length=256, micro_batch_size=2, vocab_size=1024),
    "deepseek": dict(num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512,
                     num_moe_experts=32, moe_router_topk=4, moe_ffn_hidden_size=128,
                     moe_shared_expert_intermediate_size=256, moe_z_loss_coeff=1e-3,
                     seq_length=256, micro_batch_size=2, vocab_size=1024),
}
# Realistic widths (issue 12): H=1024, two MoE layers (R_cp needs a pair), 2048 tokens per micro-batch,
# one shape per expert family (megatron_moe_spec.testing.bench.wide_shapes): Mixtral-like, OLMoE-like,
# DeepSeek-like.
_WIDE, _QUICK_WIDE = wide_shapes(num_layers=2, suffix="_wide")
SHAPES.update(_WIDE)
WIDE_SHAPES = tuple(_WIDE)
QUICK_SHAPES = {
    **_QUICK_WIDE,
    "vanilla": dict(SHAPES["vanilla"], hidden_size=64, ffn_hidden_size=128, moe_ffn_hidden_size=128,
                    seq_length=32, vocab_size=128),
    "deepseek": dict(SHAPES["deepseek"], hidden_size=64, ffn_hidden_size=128, num_moe_experts=16,
                     moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=64,
                     seq_length=32, vocab_size=128),
}
# mode: (processes = expert-parallel size, token dispatcher)
MODES = {"single": (1, "alltoall"), "ep2": (2, "alltoall"), "ep2_allgather": (2, "allgather")}


def variant_config(name: str, tokens: int):
    """The SpecializationConfig of a variant; ``budget`` b becomes sp_max_tokens = tokens // b."""
    from megatron_moe_spec.testing.bench import budgeted_spec_config

    return budgeted_spec_config(ALL_VARIANTS[name], tokens)


def bench_rank(shape: dict, dispatcher: str, warmup: int, steps: int, variants: list, profile: bool = False):
    """Runs in every rank (under run_distributed): all variants side by side, interleaved.

    ``profile``: one more step per variant under ``torch.profiler``, attributing time to
    megatron-moe-spec's named ranges (``megatron_moe_spec.core.profiling``)."""
    import torch
    import torch.distributed as dist
    from megatron_moe_spec.core import layer_metrics, moe_tracker
    from megatron_moe_spec.core.layer_specs import get_moe_block_spec, moe_layer_numbers
    from megatron_moe_spec.specialization_config import SpecializationConfig
    from megatron_moe_spec.testing.bench import SavedTensorMeter, count_collectives, static_training_bytes
    from megatron_moe_spec.testing.tiny_gpt import (
        TinyGPTSettings, build_model, build_transformer_config, local_microbatches, run_step)

    settings = TinyGPTSettings(moe_token_dispatcher_type=dispatcher, moe_aux_loss_coeff=LB, **shape)
    config = build_transformer_config(settings)
    world = dist.get_world_size() if dist.is_initialized() else 1
    cuda = torch.cuda.is_available()

    models, optimizers, params = {}, {}, {}
    reference = None
    tokens = settings.seq_length * settings.micro_batch_size
    for name in variants:
        torch.manual_seed(1234)
        spec_config = variant_config(name, tokens)
        chunks = build_model(config, settings, lambda c, vp_stage=None, s=spec_config: get_moe_block_spec(
            c, s, vp_stage=vp_stage))
        ps = [p for chunk in chunks for p in chunk.parameters()]
        if reference is None:
            reference = ps
        else:  # identical weights in every variant (the substituted modules add no parameters)
            assert [p.shape for p in ps] == [p.shape for p in reference], name
            with torch.no_grad():
                for p, r in zip(ps, reference):
                    p.copy_(r)
        models[name], params[name] = chunks, ps
        # lr = 0: the full AdamW update is computed, the weights (and routing) stay identical.
        optimizers[name] = torch.optim.AdamW(ps, lr=0.0, weight_decay=0.0, foreach=True)
    if "lb_metrics" in variants:
        layer_metrics.register_layers(moe_layer_numbers(config), config.num_moe_experts)
    batches = local_microbatches(settings)
    counts = count_collectives()

    def train_step(name):
        out = run_step(models[name], config, batches, settings)
        for p in params[name]:
            p.grad = p.main_grad
        optimizers[name].step()
        for p in params[name]:
            p.grad = None
        if ALL_VARIANTS[name].get("metrics"):
            layer_metrics.report()  # the log-time reduction, every step (metrics_interval = 1)
        moe_tracker.clear()
        return out

    def lm_loss(out):
        return float(sum(float(o["lm loss"][0]) for o in out)) if out else float("nan")

    times = {n: [] for n in variants}
    cpu_times = {n: [] for n in variants}
    losses = {n: [] for n in variants}
    comm = {}
    for step in range(warmup + steps):
        shift = step % len(variants)  # rotate the order every round: no variant always follows the same one
        for name in variants[shift:] + variants[:shift]:
            for key in counts:
                counts[key] = 0
            if world > 1:
                dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            out = train_step(name)
            if cuda:
                torch.cuda.synchronize()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            losses[name].append(lm_loss(out))
            if step == 0:
                comm[name] = sum(v for k, v in counts.items() if k != "all_reduce")
            if step >= warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)

    # Memory: one more (untimed) step per variant.
    memory = {}
    for name in variants:
        static = static_training_bytes(params[name], optimizers[name])
        if world > 1:
            dist.barrier()
        meter = SavedTensorMeter(exclude=params[name])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with meter:
            out = train_step(name)
        losses[name].append(lm_loss(out))
        entry = {"static_bytes": sum(static.values()), "static": static, "saved_bytes": meter.peak_bytes,
                 "saved_total_bytes": meter.total_bytes, "saved_storages": meter.storages,
                 "saved_live_after_step_bytes": meter.live_bytes}
        entry["model_peak_bytes"] = entry["static_bytes"] + meter.peak_bytes
        if cuda:
            entry["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        memory[name] = entry
    profiles = {}
    if profile:
        from megatron_moe_spec.core import profiling

        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        for name in variants:
            if world > 1:
                dist.barrier()
            with torch.profiler.profile(activities=activities) as prof:
                start = time.perf_counter()
                out = train_step(name)
                if cuda:
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            losses[name].append(lm_loss(out))
            events = prof.key_averages()
            entry = {"step_s": elapsed,
                     "ours_cpu_s": profiling.attributed_seconds((e.key, e.cpu_time_total) for e in events),
                     "top_self_cpu_s": {e.key: e.self_cpu_time_total * 1e-6
                                        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]}}
            if cuda:  # kernels launched inside a range count towards it
                entry["ours_device_s"] = profiling.attributed_seconds(
                    (e.key, getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))) for e in events)
            profiles[name] = entry
    return {"median_step_s": {n: statistics.median(t) for n, t in times.items()}, "profile": profiles,
            "step_times_s": times, "step_cpu_s": cpu_times, "memory": memory, "lm_losses": losses, "token_comm_bytes": comm,
            "cuda": cuda, "threads": torch.get_num_threads()}


def summarize(ranks: list, variants: list) -> dict:
    rank0 = ranks[0]
    med = rank0["median_step_s"]
    # CPU time of a step: this process's CPU seconds (all its threads), summed over the ranks. Time a
    # process waits (for a core held by another job, or for its peer in a collective) is not in it.
    cpu = {n: [sum(step) for step in zip(*(r["step_cpu_s"][n] for r in ranks))] for n in variants}
    cpu_med = {n: statistics.median(v) for n, v in cpu.items()}
    mem_key = "cuda_max_allocated_bytes" if rank0["cuda"] else "model_peak_bytes"
    peak = {n: max(r["memory"][n][mem_key] for r in ranks) for n in variants}
    saved = {n: max(r["memory"][n]["saved_bytes"] for r in ranks) for n in variants}
    # Same weights, same data: every variant's LM loss must agree at every step (on every rank).
    loss_spread = max(max(abs(a - b) for a, b in zip(r["lm_losses"][n], r["lm_losses"]["lb"]))
                      for r in ranks for n in variants)
    out = {}
    for n in variants:
        m = rank0["memory"][n]
        # Per-round ratios (v's step / lb's step of the same interleaved round): their spread shows the noise.
        paired = sorted(t / b for t, b in zip(rank0["step_times_s"][n], rank0["step_times_s"]["lb"]))
        q = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [paired[0]] * 3
        out[n] = {
            "step_time_ratio": med[n] / med["lb"],
            "paired_ratio_quartiles": [q[0], q[1], q[2]],
            "cpu_time_ratio": cpu_med[n] / cpu_med["lb"],
            "median_step_cpu_s": cpu_med[n],
            "step_cpu_s": cpu[n],
            "peak_mem_ratio": peak[n] / peak["lb"],
            "saved_bytes_ratio": saved[n] / saved["lb"],
            "median_step_s": med[n],
            "step_times_s": rank0["step_times_s"][n],
            "peak_mem_bytes": peak[n],
            "peak_mem_measure": "cuda_max_memory_allocated" if rank0["cuda"] else
                                "static (params + grad buffer + AdamW state) + saved-for-backward bytes",
            "static_bytes": m["static_bytes"],
            "saved_bytes": saved[n],
            "extra_saved_bytes": saved[n] - saved["lb"],
            "token_comm_bytes": rank0["token_comm_bytes"][n],
            "lm_loss_max_abs_diff_vs_lb": loss_spread,
        }
        prof = rank0.get("profile", {})
        if n in prof:
            # rank 0's profiled step: the time in our ranges and backward nodes (a lower bound of the added
            # time, see megatron_moe_spec.core.profiling) as a share of the same step, and the step-time
            # ratio it implies against the step without it (a lower bound).
            share = prof[n]["ours_cpu_s"]["total"] / prof[n]["step_s"]
            out[n]["profile"] = {**prof[n], "ours_share_of_step": share, "implied_ratio_at_least": 1 / (1 - share)}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, single process, 1+2 steps (smoke test)")
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=None,
                        help="default: vanilla deepseek; the realistic widths: " + " ".join(WIDE_SHAPES))
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=None,
                        help="single (1 process), ep2 (2 gloo processes, EP=2, alltoall dispatcher), ep2_allgather "
                             "(the same with the allgather dispatcher); default all (--quick: single)")
    parser.add_argument("--variants", nargs="+", choices=tuple(ALL_VARIANTS), default=None,
                        help="default: every variant of VARIANTS; with a wide shape, " + " ".join(WIDE_DEFAULT_VARIANTS))
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 2; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 21; quick 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here (after every shape and mode)")
    parser.add_argument("--profile", action="store_true",
                        help="one more step per variant under torch.profiler: the time in megatron-moe-spec's named "
                             "ranges and backward nodes (megatron_moe_spec.core.profiling), a lower bound of the "
                             "added time, less sensitive to the machine's load than step-time ratios")
    parser.add_argument("--resume", action="store_true",
                        help="keep the (shape, mode) entries already in --json and run only the missing ones")
    args = parser.parse_args(argv)

    from megatron_moe_spec.testing.distributed import ParallelSizes, run_distributed

    shapes = QUICK_SHAPES if args.quick else SHAPES
    shape_names = args.shapes or ["vanilla", "deepseek"]
    modes = args.modes or (["single"] if args.quick else list(MODES))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (2 if args.quick else 21)
    default_variants = WIDE_DEFAULT_VARIANTS if any(n in WIDE_SHAPES for n in shape_names) else list(VARIANTS)
    variants = list(dict.fromkeys(["lb"] + (args.variants or default_variants)))

    results = {}
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)
    results["setup"] = {"quick": args.quick, "modes": {m: MODES[m] for m in modes}, "warmup": warmup, "steps": steps,
                        "lb_coeff": LB, "variants": {n: ALL_VARIANTS[n] for n in variants},
                        "shapes": {n: shapes[n] for n in shape_names}, "threads_per_process": 1}
    print(f"warm-up {warmup}, timed {steps} steps per variant (interleaved); one thread per process")
    header = (f"{'shape':<9} {'mode':<13} {'variant':<11} {'step ms':>8} {'time x':>7} {'paired IQR':>13} "
              f"{'cpu x':>6} {'peak mem x':>10} "
              f"{'saved MB':>9} {'saved x':>8} {'token comm MB':>13}")
    print(header)
    print("-" * len(header))
    for shape_name in shape_names:
        results.setdefault(shape_name, {})
        for mode in modes:
            done = results[shape_name].get(mode, {})
            if set(done) >= set(variants) and (not args.profile or all("profile" in done[n] for n in variants)):
                summary = results[shape_name][mode]  # --resume: measured by an earlier run
            else:
                world, dispatcher = MODES[mode]
                ranks = run_distributed(bench_rank, world, ParallelSizes(ep=world),
                                        args=(shapes[shape_name], dispatcher, warmup, steps, variants, args.profile),
                                        timeout=3600)
                summary = summarize(ranks, variants)
                results[shape_name][mode] = summary
                if args.json:
                    with open(args.json, "w") as f:
                        f.write(json.dumps(results, indent=1) + "\n")
            for n in variants:
                s = summary[n]
                q = s["paired_ratio_quartiles"]
                print(f"{shape_name:<9} {mode:<13} {n:<11} {1e3 * s['median_step_s']:8.1f} "
                      f"{s['step_time_ratio']:7.3f} {q[0]:6.3f}-{q[2]:<6.3f} {s['cpu_time_ratio']:6.3f} {s['peak_mem_ratio']:10.4f} {s['saved_bytes'] / 1e6:9.2f} "
                      f"{s['saved_bytes_ratio']:8.3f} {s['token_comm_bytes'] / 1e6:13.2f}", flush=True)
            for n in variants:
                p = summary[n].get("profile")
                if p is not None:
                    parts = ", ".join(f"{k.replace('moe_spec/', '')} {1e3 * v:.1f}" for k, v in p["ours_cpu_s"].items()
                                      if k != "total")
                    print(f"    profile {n:<11} step {1e3 * p['step_s']:8.1f} ms, ours {1e3 * p['ours_cpu_s']['total']:7.1f} ms "
                          f"= {100 * p['ours_share_of_step']:5.2f}% of it, time x >= {p['implied_ratio_at_least']:.3f} "
                          f"({parts or 'none'})", flush=True)
            spread = summary["lb"]["lm_loss_max_abs_diff_vs_lb"]
            if not spread <= 1e-5 or not math.isfinite(spread):
                raise AssertionError(f"{shape_name}/{mode}: the variants' LM losses differ by {spread}: "
                                     "their weights or data are not identical")
    print("time x = median step / lb's; paired IQR = quartiles of the per-round ratios; cpu x = median CPU seconds of a step "
          "(process time, summed over ranks) / lb's; lb_again = a second "
          "copy of lb (A/A control: its distance from 1 is measurement noise); peak mem x = (static + saved-for-backward) / lb's (CPU model, see "
          "--help); saved x = saved-for-backward bytes / lb's; token comm = all-to-all/gather/reduce-scatter "
          "payload per step")
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
