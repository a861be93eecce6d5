"""A first-vs-last table of a run directory's metrics.jsonl (the demo prints it at the end).

    python -m megatron_moe_spec.training.summary RUN_DIR
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import List, Optional

ROWS = ("lm_loss", "val_lm_loss", "test_lm_loss", "load_balancing_loss", "seq_load_balancing_loss",
        "global_load_balancing_loss", "z_loss", "specialization_loss", "coupling_loss",
        "orthogonality_loss", "variance_loss", "routing_entropy", "activation_similarity", "load_cv",
        "pathway_nmi", "domain_mi")


def _first_last(records: List[dict], key: str):
    values = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return (values[0], values[-1]) if values else None


def summarize(run_dir: str) -> Optional[str]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    rows = []
    for key in ROWS:
        fl = _first_last(records, key)
        if fl is None:
            continue
        (s0, v0), (s1, v1) = fl
        rows.append((key, f"{v0:.4g} (step {s0})", f"{v1:.4g} (step {s1})", f"{v1 - v0:+.3g}"))
    if not rows:
        return None
    header = ("metric", "first", "last", "change")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    speed = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]
    if speed:
        lines.append(f"throughput: median {sorted(speed)[len(speed) // 2]:,.0f} tokens/s over "
                     f"{len(records)} logged steps")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m megatron_moe_spec.training.summary RUN_DIR", file=sys.stderr)
        sys.exit(2)
    table = summarize(sys.argv[1])
    if table is None:
        print(f"no metrics in {sys.argv[1]}/metrics.jsonl", file=sys.stderr)
        sys.exit(1)
    print(table)
