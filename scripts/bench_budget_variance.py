#!/usr/bin/env python
"""How good an estimate of R_sp the ``sp_max_tokens`` subset is: bias and variance over its offsets.

With a budget of m tokens out of N, the subset is every position q with q % c == offset % c,
c = ceil(N / m), and the MoE layer rotates ``offset`` with the training step. Over the c offsets every
position is chosen exactly once, so the mean over offsets of the per-offset *sums* is the full sum / c;
R_sp is a *mean* over the chosen valid tokens, so the mean over offsets equals the full R_sp exactly
when every offset class holds the same number of valid tokens (all valid, c divides N), and is a
ratio estimate otherwise (bias O(1/m)).

This script takes one micro-batch through a GPT-MoE in one process, captures each MoE layer's z
[T, k, F] (at initialization: random weights, the synthetic test data), and reports per layer and
budget: the full R_sp, the mean and standard deviation of the sub-sampled R_sp over all c offsets,
the relative bias, and ``variance_ratio`` = Var over offsets / Var of a uniform random sample of m
tokens without replacement (var(r_t) / m * (N - m) / (N - 1), r_t the per-token values): 1 means the
strided subset is as good as random sampling, below 1 better (tokens near each other are alike and
the stride spreads the sample).

    PYTHONPATH=. python scripts/bench_budget_variance.py [--json OUT]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPE = dict(num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512, num_moe_experts=8,
             moe_router_topk=2, moe_ffn_hidden_size=896, seq_length=1024, micro_batch_size=2, vocab_size=1024,
             moe_aux_loss_coeff=0.0)
BUDGETS = (4, 16)


def measure(shape: dict, budgets) -> dict:
    import torch

    from megatron_moe_spec import losses
    from megatron_moe_spec.core.layer_specs import get_moe_block_spec
    from megatron_moe_spec.specialization_config import SpecializationConfig
    from megatron_moe_spec.testing.tiny_gpt import (
        TinyGPTSettings, build_model, build_transformer_config, global_microbatches)

    settings = TinyGPTSettings(**shape)
    config = build_transformer_config(settings)
    torch.manual_seed(1234)
    spec = functools.partial(get_moe_block_spec, spec_config=SpecializationConfig(sp_coeff=1.0))
    model = build_model(config, settings, spec, wrap_ddp=False)[0]
    model.train()
    captured = []
    real = losses.specialization_loss

    def spy(z, valid=None, *args, **kwargs):
        captured.append((z.detach().float(), valid.detach().clone()))
        return real(z, valid, *args, **kwargs)

    losses.specialization_loss = spy
    try:
        batch = global_microbatches(settings, 1)[0]
        model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
              labels=batch["labels"])  # training mode with grad: the pass whose losses read z
    finally:
        losses.specialization_loss = real
    S, B = settings.seq_length, settings.micro_batch_size
    out = {"shape": shape, "tokens": S * B, "layers": []}
    for layer, (z_TKF, valid_T) in enumerate(captured):
        # Per-token values r_t (R_sp of a single token), for the random-sampling reference.
        r_T = torch.stack([real(z_TKF[t:t + 1]) for t in range(z_TKF.shape[0])]).double()
        full = float(real(z_TKF, valid_T))
        entry = {"layer": layer, "full": full, "budgets": {}}
        n = int(valid_T.sum())
        var_token = float(r_T[valid_T].var(unbiased=False))
        for b in budgets:
            m = max(1, S * B // b)
            stride = -(-S * B // m)
            values = [float(real(z_TKF, valid_T & losses.global_strided_mask(S, B, 0, S, m, offset=o)))
                      for o in range(stride)]
            v = torch.tensor(values, dtype=torch.float64)
            var_random = var_token / m * (n - m) / max(n - 1, 1)
            entry["budgets"][f"1/{b}"] = {
                "max_tokens": m, "offsets": stride, "mean_over_offsets": float(v.mean()),
                "relative_bias": float(v.mean()) / full - 1.0, "std_over_offsets": float(v.std(unbiased=False)),
                "relative_std": float(v.std(unbiased=False)) / full, "random_sample_std": var_random ** 0.5,
                "variance_ratio": float(v.var(unbiased=False)) / var_random if var_random > 0 else None,
            }
        out["layers"].append(entry)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    from megatron_moe_spec.testing.distributed import ParallelSizes, run_distributed

    result = run_distributed(measure, 1, ParallelSizes(), args=(SHAPE, BUDGETS), timeout=1800)[0]
    print(f"{'layer':>5} {'budget':>6} {'full R_sp':>10} {'mean/offs':>10} {'rel bias':>9} {'rel std':>8} "
          f"{'var ratio':>9}")
    for entry in result["layers"]:
        for b, v in entry["budgets"].items():
            print(f"{entry['layer']:5d} {b:>6} {entry['full']:10.6f} {v['mean_over_offsets']:10.6f} "
                  f"{v['relative_bias']:9.2e} {v['relative_std']:8.4f} {v['variance_ratio']:9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
