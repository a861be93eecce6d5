#!/usr/bin/env python
"""What R_sp / L_o cost under expert parallelism: bytes moved and step time, against the dispatch.

Under EP a token's k experts live on different ranks; R_sp (and L_o) need each token's k expert rows
side by side, so megatron_moe_spec sends them back through the dispatcher's combine path (see
megatron_moe_spec/core/token_exchange.py). This script runs a small GPT-MoE on 2 gloo processes
(EP=2) and measures, in one run with the variants interleaved:

- bytes: every collective's payload (all-to-all, all-gather, reduce-scatter, all-reduce) counted in
  one training step, per variant: ``off`` (megatron alone), ``sp`` (R_sp on), ``sp_ortho`` (R_sp + L_o);
  the dispatcher's own token traffic is the ``off`` all-to-all / gather bytes;
- time: median step time over repeated steps, as a ratio to ``off``.

    PYTHONPATH=. python scripts/bench_exchange.py [--dispatcher alltoall|allgather] [--steps 6] [--json OUT]
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

VARIANTS = {
    "off": {},
    "sp": {"sp_coeff": 2e-3},
    "sp_ortho": {"sp_coeff": 2e-3, "ortho_coeff": 2e-3},
}


def bench_rank(dispatcher: str, steps: int, hidden: int, ffn: int, experts: int, topk: int, seq: int, mbs: int):
    import torch

    from megatron_moe_spec.core.layer_specs import get_moe_block_spec
    from megatron_moe_spec.specialization_config import SpecializationConfig
    from megatron_moe_spec.testing.bench import count_collectives
    from megatron_moe_spec.testing.tiny_gpt import (
        TinyGPTSettings, build_model, build_transformer_config, local_microbatches, run_step)

    settings = TinyGPTSettings(num_layers=2, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=2 * hidden,
                               num_moe_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=ffn,
                               moe_token_dispatcher_type=dispatcher, seq_length=seq, micro_batch_size=mbs,
                               vocab_size=512)
    config = build_transformer_config(settings)
    models = {}
    for name, coeffs in VARIANTS.items():
        torch.manual_seed(1234)
        spec = functools.partial(get_moe_block_spec, spec_config=SpecializationConfig(**coeffs))
        models[name] = build_model(config, settings, spec)
    batches = local_microbatches(settings)
    counts = count_collectives()
    bytes_per_step, times = {}, {name: [] for name in VARIANTS}
    for step in range(steps + 1):
        for name, chunks in models.items():  # interleaved: machine noise hits every variant alike
            for key in counts:
                counts[key] = 0
            torch.distributed.barrier()
            start = time.perf_counter()
            run_step(chunks, config, batches, settings)
            elapsed = time.perf_counter() - start
            if step == 0:
                bytes_per_step[name] = dict(counts)  # identical every step; warm-up step not timed
            else:
                times[name].append(elapsed)
    return {"bytes": bytes_per_step, "median_step_s": {n: statistics.median(t) for n, t in times.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dispatcher", choices=("alltoall", "allgather"), default="alltoall")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=128, help="moe_ffn_hidden_size F")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--mbs", type=int, default=2)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)

    from megatron_moe_spec.testing.distributed import ParallelSizes, run_distributed

    results = run_distributed(
        bench_rank, 2, ParallelSizes(ep=2),
        args=(args.dispatcher, args.steps, args.hidden, args.ffn, args.experts, args.topk, args.seq, args.mbs),
        timeout=1800)
    rank0 = results[0]
    off_bytes = rank0["bytes"]["off"]
    token_traffic = off_bytes["all_to_all"] + off_bytes["all_gather"] + off_bytes["reduce_scatter"]
    summary = {
        "setup": vars(args) | {"ep": 2, "processes": 2},
        "dispatcher_token_bytes_per_step": token_traffic,
        "variants": {},
    }
    for name in VARIANTS:
        b = rank0["bytes"][name]
        total = b["all_to_all"] + b["all_gather"] + b["reduce_scatter"]
        summary["variants"][name] = {
            "collective_bytes_per_step": b,
            "extra_token_bytes_vs_off": total - token_traffic,
            "token_bytes_ratio_vs_off": total / token_traffic if token_traffic else None,
            "step_time_ratio": rank0["median_step_s"][name] / rank0["median_step_s"]["off"],
            "median_step_s": rank0["median_step_s"][name],
        }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
