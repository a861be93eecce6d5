#!/usr/bin/env python
"""What R_sp / L_o cost under expert parallelism: bytes moved and step time, against the dispatch.

Under EP a token's k experts live on different ranks; R_sp (and L_o) need each token's k expert rows
side by side, so megatron_moe_spec sends them back through the dispatcher's combine path (see
megatron_moe_spec/core/token_exchange.py). With ``sp_max_tokens`` (and the alltoall dispatcher) only
the selected tokens' rows travel. This script runs a GPT-MoE on 2 gloo processes (EP=2; or 1 process,
``--modes single``: no exchange, time only) and measures, in one run per (shape, dtype, mode) with the
variants interleaved:

- bytes: every collective's payload (all-to-all, all-gather, reduce-scatter; all-reduce apart)
  counted in one training step (forward + backward), summed over the ranks, per variant: ``off``
  (megatron alone), ``sp`` (R_sp, exact), ``sp_b4`` / ``sp_b16`` (R_sp with ``sp_max_tokens`` = 1/4
  and 1/16 of a micro-batch's tokens), ``sp_ortho`` (R_sp + L_o, exact). megatron's dispatch bytes
  are the ``off`` bytes; ``exchange_over_dispatch`` = (variant - off) / off; ``rows_over_*`` leave
  out the selection mask (uint8, one byte per routed row, forward only: ``mask_bytes``). Deterministic: the
  row counts summed over the ranks do not depend on the routing (dropless), so one step suffices;
- time: median step time over ``--steps`` timed steps after one warm-up, as a ratio to ``off``,
  with ``off_again`` (a second ``off``: the A/A control, its distance from 1 is noise).

Shapes (``--shapes``): ``mixtral`` (H=1024, F/H=3.5, 8 experts top-2), ``olmoe`` (H=1024, F/H=0.5,
64 experts top-8), ``deepseek`` (H=1024, F/H=0.25, 64 experts top-8 + a shared expert), each with one
MoE layer and 2048 tokens per micro-batch (sequence 1024, micro-batch 2); ``small`` is the earlier
hidden-256 shape. ``--quick``: the same expert families at H=128, 256 tokens, 2 steps.

    PYTHONPATH=. python scripts/bench_exchange.py --steps 0 --json out.json   # bytes only, all shapes, fp32+bf16
    PYTHONPATH=. python scripts/bench_exchange.py --quick                     # smoke run (< 2 min)
    PYTHONPATH=. python scripts/bench_exchange.py --shapes mixtral --dtypes bf16 --steps 5 --json out.json --resume

``--resume`` keeps the entries already in ``--json`` and runs only the missing (shape, dtype, mode)
entries; the file is rewritten after each entry.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_moe_spec.testing.bench import wide_shapes  # noqa: E402

# "budget": sp_max_tokens = tokens of a micro-batch // budget.
VARIANTS = {
    "off": {},
    "sp": {"sp_coeff": 2e-3},
    "sp_b4": {"sp_coeff": 2e-3, "budget": 4},
    "sp_b16": {"sp_coeff": 2e-3, "budget": 16},
    "sp_ortho": {"sp_coeff": 2e-3, "ortho_coeff": 2e-3},
    "off_again": {},
}

SHAPES, QUICK_SHAPES = wide_shapes(num_layers=1)  # mixtral, olmoe, deepseek (megatron_moe_spec.testing.bench)
SHAPES["small"] = dict(num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512, num_moe_experts=8,
                       moe_router_topk=2, moe_ffn_hidden_size=128, seq_length=256, micro_batch_size=2, vocab_size=512)
QUICK_SHAPES["small"] = dict(SHAPES["small"], seq_length=64)
MODES = {"ep2": 2, "single": 1}
DTYPES = ("fp32", "bf16")


def spec_config(name: str, tokens: int):
    from megatron_moe_spec.testing.bench import budgeted_spec_config

    return budgeted_spec_config(VARIANTS[name], tokens)


def bench_rank(shape: dict, dispatcher: str, dtype: str, steps: int, variants: list):
    import torch
    import torch.distributed as dist

    from megatron_moe_spec.core.layer_specs import get_moe_block_spec
    from megatron_moe_spec.testing.bench import count_collectives
    from megatron_moe_spec.testing.tiny_gpt import (
        TinyGPTSettings, build_model, build_transformer_config, local_microbatches, run_step)

    extra = {}
    if dtype == "bf16":
        extra = {"params_dtype": torch.bfloat16, "bf16": True, "pipeline_dtype": torch.bfloat16}
    settings = TinyGPTSettings(moe_token_dispatcher_type=dispatcher, extra_config=extra, **shape)
    config = build_transformer_config(settings)
    tokens = settings.seq_length * settings.micro_batch_size
    world = dist.get_world_size() if dist.is_initialized() else 1
    models = {}
    for name in variants:
        torch.manual_seed(1234)
        spec = spec_config(name, tokens)
        models[name] = build_model(config, settings, lambda c, vp_stage=None, s=spec: get_moe_block_spec(
            c, s, vp_stage=vp_stage))
    batches = local_microbatches(settings)
    counts = count_collectives()
    # The selection mask (uint8, 1 byte per routed row) apart: index metadata, not rows.
    real_a2a = dist.all_to_all_single if world > 1 else None
    if real_a2a is not None:
        def a2a_counting_masks(output, input, *a, **kw):
            if input.dtype == torch.uint8:
                counts["mask_uint8"] += input.numel()
            return real_a2a(output, input, *a, **kw)

        counts["mask_uint8"] = 0
        dist.all_to_all_single = a2a_counting_masks
    bytes_per_step, times = {}, {name: [] for name in variants}
    for step in range(steps + 1):
        shift = step % len(variants)  # rotate the order every round
        for name in variants[shift:] + variants[:shift]:
            for key in counts:
                counts[key] = 0
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            run_step(models[name], config, batches, settings)
            elapsed = time.perf_counter() - start
            if step == 0:
                bytes_per_step[name] = dict(counts)  # identical every step; warm-up step not timed
            else:
                times[name].append(elapsed)
    return {"bytes": bytes_per_step, "step_times_s": times, "tokens_per_microbatch": tokens}


def summarize(ranks: list, variants: list, shape: dict) -> dict:
    token_keys = ("all_to_all", "all_gather", "reduce_scatter")
    # Summed over the ranks: an expert rank sends what its experts computed, whose count depends on
    # the routing; the sum over ranks does not.
    total = {n: {k: sum(r["bytes"][n][k] for r in ranks) for k in ranks[0]["bytes"][n]} for n in variants}
    dispatch = sum(total["off"][k] for k in token_keys)
    rank0 = ranks[0]
    timed = all(rank0["step_times_s"][n] for n in variants)
    out = {"dispatch_bytes_per_step": dispatch,
           "values_ratio_F_over_2H": shape["moe_ffn_hidden_size"] / (2 * shape["hidden_size"]),
           "tokens_per_microbatch": rank0["tokens_per_microbatch"], "variants": {}}
    exact = None
    for n in variants:
        extra = sum(total[n][k] for k in token_keys) - dispatch
        mask = total[n].get("mask_uint8", 0)  # included in all_to_all
        if n == "sp":
            exact = extra
        entry = {"collective_bytes_per_step": total[n], "exchange_bytes": extra, "mask_bytes": mask,
                 "exchange_over_dispatch": extra / dispatch if dispatch else None,
                 "rows_over_dispatch": (extra - mask) / dispatch if dispatch else None}
        if timed:
            med = statistics.median(rank0["step_times_s"][n])
            paired = sorted(t / b for t, b in zip(rank0["step_times_s"][n], rank0["step_times_s"]["off"]))
            entry.update(median_step_s=med, step_time_ratio=med / statistics.median(rank0["step_times_s"]["off"]),
                         paired_ratio_min_max=[paired[0], paired[-1]], step_times_s=rank0["step_times_s"][n])
        out["variants"][n] = entry
    if exact:
        for n in variants:
            v = out["variants"][n]
            v["exchange_over_exact"] = v["exchange_bytes"] / exact
            v["rows_over_exact"] = (v["exchange_bytes"] - v["mask_bytes"]) / exact
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="narrow shapes (H=128), 256 tokens, 2 timed steps")
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=None,
                        help="default: mixtral olmoe deepseek")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=["ep2"],
                        help="ep2 (2 gloo processes, EP=2; default) and/or single (1 process: no exchange, time only)")
    parser.add_argument("--dispatcher", choices=("alltoall", "allgather"), default="alltoall")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (0 = bytes only; "
                                                                "default 5, quick 2)")
    parser.add_argument("--json", help="write the results here (after every entry)")
    parser.add_argument("--resume", action="store_true", help="keep the entries already in --json, run the rest")
    args = parser.parse_args(argv)

    from megatron_moe_spec.testing.distributed import ParallelSizes, run_distributed

    shapes = QUICK_SHAPES if args.quick else SHAPES
    shape_names = args.shapes or ["mixtral", "olmoe", "deepseek"]
    steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    variants = list(dict.fromkeys(["off"] + args.variants))
    if steps and "off_again" not in variants:
        variants.append("off_again")
    if not steps and "off_again" in variants:
        variants.remove("off_again")  # bytes only: the A/A control measures nothing
    results = {}
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)
    results["setup"] = {"quick": args.quick, "dispatcher": args.dispatcher, "steps": steps, "variants":
                        {n: VARIANTS[n] for n in variants}, "shapes": {n: shapes[n] for n in shape_names}}
    print(f"{'shape':<9} {'dtype':<5} {'mode':<6} {'variant':<10} {'exchange/dispatch':>17} {'/exact':>7} "
          f"{'rows/exact':>10} {'step x':>7}")
    for shape_name in shape_names:
        for dtype in args.dtypes:
            for mode in args.modes:
                key = f"{shape_name}/{dtype}/{mode}/{args.dispatcher}"
                if key not in results:
                    world = MODES[mode]
                    ranks = run_distributed(bench_rank, world, ParallelSizes(ep=world),
                                            args=(shapes[shape_name], args.dispatcher, dtype, steps, variants),
                                            timeout=7200)
                    results[key] = summarize(ranks, variants, shapes[shape_name])
                    if args.json:
                        with open(args.json, "w") as f:
                            f.write(json.dumps(results, indent=1) + "\n")
                entry = results[key]
                for n, v in entry["variants"].items():
                    ratio = v["exchange_over_dispatch"]
                    print(f"{shape_name:<9} {dtype:<5} {mode:<6} {n:<10} "
                          f"{ratio if ratio is not None else float('nan'):17.4f} "
                          f"{v.get('exchange_over_exact', float('nan')):7.4f} "
                          f"{v.get('rows_over_exact', float('nan')):10.4f} "
                          f"{v.get('step_time_ratio', float('nan')):7.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
