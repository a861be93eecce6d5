"""A synthetic run directory, for the report's tests and documentation (no training needed).

The numbers are simulated, not trained, but they are internally consistent: tokens with a domain
label are routed by a per-layer router whose logits sharpen over the steps, and every logged metric
is computed from that simulated routing with the definitions of the spec (section Metrics), so
``load_cv/layer_i`` in metrics.jsonl agrees with ``tokens_per_expert`` in routing.jsonl, and so on.

    python -m megatron_moe_spec.report.synthetic OUT_DIR [--name NAME] [--no-specialization]
        [--no-domains] [--no-val] [--seed N]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np


@dataclass
class SyntheticSpec:
    name: str = "synthetic"
    num_layers: int = 4
    dense_layers: Sequence[int] = (0,)
    num_experts: int = 8
    topk: int = 2
    domains: Optional[Sequence[str]] = ("code", "math", "prose")
    """Domain names; None = data without domain labels (no ``expert_domain``, no ``domain_mi``)."""
    train_steps: int = 400
    log_interval: int = 10
    eval_interval: Optional[int] = 50
    """None = no validation (no ``val_lm_loss``)."""
    tokens_per_step: int = 768
    specialization: bool = True
    """R_sp and R_cp on (their losses are logged, experts grow apart, pathways grow consistent)."""
    z_loss: bool = False
    seed: int = 0
    extra_config: Dict = field(default_factory=dict)

    @property
    def moe_layers(self) -> List[int]:
        return [i for i in range(self.num_layers) if i not in set(self.dense_layers)]


def _entropy(p, axis=-1):
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=axis)


def _mi_from_joint(counts) -> float:
    """Mutual information (nats) of the joint distribution given by a count matrix."""
    joint = np.asarray(counts, dtype=float)
    total = joint.sum()
    if total <= 0:
        return 0.0
    joint = joint / total
    return float(_entropy(joint.sum(1)) + _entropy(joint.sum(0)) - _entropy(joint.ravel()))


def _nmi_from_joint(counts) -> float:
    joint = np.asarray(counts, dtype=float)
    joint = joint / max(joint.sum(), 1e-12)
    h = math.sqrt(max(float(_entropy(joint.sum(1)) * _entropy(joint.sum(0))), 1e-12))
    return _mi_from_joint(counts) / h


def _r(x: float) -> float:
    return float(f"{float(x):.6g}")


def write_synthetic_run(path: str, spec: Optional[SyntheticSpec] = None, **overrides) -> str:
    """Write config.yaml, metrics.jsonl and routing.jsonl of a synthetic run into ``path``
    (created if needed). Keyword arguments override fields of ``spec``. Returns ``path``."""
    spec = dataclasses.replace(spec or SyntheticSpec(), **overrides)
    rng = np.random.default_rng(spec.seed)
    os.makedirs(path, exist_ok=True)
    E, K = spec.num_experts, spec.topk
    moe = spec.moe_layers
    n_dom = len(spec.domains) if spec.domains else 3  # the data has topics even when unlabelled
    T = spec.tokens_per_step
    sp = spec.specialization

    # Per-layer router: each expert prefers one domain; a popularity bias that load balancing removes.
    prefs = {l: rng.permutation(np.arange(E) % n_dom) for l in moe}
    affinity = {l: np.where(prefs[l][None, :] == np.arange(n_dom)[:, None], 1.0, -0.5) for l in moe}
    popularity = {l: rng.normal(0, 1.0, E) for l in moe}
    mixing = {l: rng.normal(0, 1.0, (E, E)) / math.sqrt(E) for l in moe}
    base_sim = {}
    for l in moe:
        s = rng.uniform(0.25, 0.6, (E, E))
        s = (s + s.T) / 2
        np.fill_diagonal(s, 0.0)
        base_sim[l] = s

    _write_config(path, spec)
    metrics_f = open(os.path.join(path, "metrics.jsonl"), "w")
    routing_f = open(os.path.join(path, "routing.jsonl"), "w")
    try:
        for step in range(spec.log_interval, spec.train_steps + 1, spec.log_interval):
            progress = 1.0 - math.exp(-step / (spec.train_steps / 4))
            sharp = 0.3 + (2.0 if sp else 0.4) * progress
            domain_t = rng.integers(0, n_dom, T)
            latent_t = rng.normal(0, 1.0, (T, E))  # shared by all layers: what coupling aligns
            rec: Dict[str, float] = {"step": step}
            layers_out: Dict[str, dict] = {}
            per_layer: Dict[str, Dict[int, float]] = {}
            top1: Dict[int, np.ndarray] = {}
            mass: Dict[int, np.ndarray] = {}

            def put(name, layer, value):
                per_layer.setdefault(name, {})[layer] = float(value)

            for l in moe:
                coupling = (1.0 if sp else 0.3) * progress
                logits = (
                    sharp * affinity[l][domain_t]
                    + popularity[l][None, :] * (1.0 - 0.8 * progress)
                    + coupling * latent_t @ mixing[l]
                    + rng.normal(0, 1.0, (T, E))
                )
                p = np.exp(logits - logits.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                topk = np.argsort(-p, axis=1)[:, :K]
                top1[l] = topk[:, 0]
                mass[l] = np.take_along_axis(p, topk, 1).sum(1)
                counts = np.bincount(topk.ravel(), minlength=E).astype(float)

                # co-activation and similarity of co-activated pairs
                member = np.zeros((T, E), bool)
                np.put_along_axis(member, topk, True, 1)
                both = member.T.astype(float) @ member.astype(float)
                either = counts[:, None] + counts[None, :] - both
                np.fill_diagonal(both, 0.0)
                iu = np.triu_indices(E, 1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    jacc = np.where(either > 0, both / either, 0.0)
                sim = base_sim[l] * (1.0 - (0.75 if sp else 0.2) * progress)
                sim = np.clip(sim + rng.normal(0, 0.01, (E, E)), 0.0, 1.0)
                sim = (sim + sim.T) / 2
                sim = np.where(both > 0, sim, 0.0)
                np.fill_diagonal(sim, 0.0)

                mean_p = p.mean(0)
                lb = E * float((counts / (T * K)) @ mean_p)
                put("routing_entropy", l, _entropy(p).mean() / math.log(E))
                put("topk_mass", l, mass[l].mean())
                put("load_cv", l, counts.std() / counts.mean())
                put("max_vio", l, counts.max() / counts.mean() - 1.0)
                put("dead_experts", l, int((counts == 0).sum()))
                put("token_expert_mi", l, _entropy(mean_p) - _entropy(p).mean())
                put("coactivation", l, jacc[iu].mean())
                w = both[iu]
                put("activation_similarity", l, float((sim[iu] * w).sum() / max(w.sum(), 1.0)))
                put("load_balancing_loss", l, lb)
                if spec.z_loss:
                    put("z_loss", l, float((np.log(np.exp(logits).sum(1)) ** 2).mean()))
                if sp:
                    put("specialization_loss", l, float((sim[iu] ** 2 * w).sum() / max(w.sum(), 1.0)))

                entry = {
                    "tokens_per_expert": [int(c) for c in counts],
                    "similarity": [[_r(v) for v in row] for row in sim],
                }
                if spec.domains:
                    ed = np.zeros((E, n_dom))
                    np.add.at(ed, (top1[l], domain_t), 1)
                    entry["expert_domain"] = [[int(v) for v in row] for row in ed]
                    put("domain_mi", l, _mi_from_joint(ed))
                layers_out[str(l)] = entry

            for a, b in zip(moe[:-1], moe[1:]):
                tr = np.zeros((E, E))
                np.add.at(tr, (top1[a], top1[b]), 1)
                layers_out[str(a)]["transition"] = [[int(v) for v in row] for row in tr]
                put("pathway_nmi", a, _nmi_from_joint(tr))
                if sp:
                    put("coupling_loss", a, -float((mass[a] * mass[b]).mean()))

            lm = 2.3 + 7.5 * math.exp(-step / 70.0) + (-0.06 if sp else 0.0) * progress
            rec["lm_loss"] = _r(lm + rng.normal(0, 0.04))
            if spec.eval_interval and step % spec.eval_interval == 0:
                rec["val_lm_loss"] = _r(lm + 0.08 + rng.normal(0, 0.015))
            warm = min(1.0, step / (spec.train_steps * 0.1))
            rec["lr"] = _r(3e-4 * warm * 0.5 * (1 + math.cos(math.pi * step / spec.train_steps)))
            rec["tokens_per_sec"] = _r(2.0e4 * (0.92 if sp else 1.0) + rng.normal(0, 300))
            rec["step_time_s"] = _r(T * 16 / rec["tokens_per_sec"])
            for name, values in per_layer.items():
                rec[name] = _r(np.mean(list(values.values())))
                for l, v in sorted(values.items()):
                    rec[f"{name}/layer_{l}"] = _r(v)
            metrics_f.write(json.dumps(rec) + "\n")
            routing_f.write(json.dumps({"step": step, "layers": layers_out}) + "\n")
    finally:
        metrics_f.close()
        routing_f.close()
    return path


def _write_config(path: str, spec: SyntheticSpec) -> None:
    import yaml

    config = {
        "name": spec.name,
        "synthetic": True,
        "model": {
            "num_layers": spec.num_layers,
            "hidden_size": 256,
            "num_moe_experts": spec.num_experts,
            "moe_router_topk": spec.topk,
            "moe_layer_freq": [0 if i in set(spec.dense_layers) else 1 for i in range(spec.num_layers)],
            "moe_ffn_hidden_size": 512,
        },
        "specialization": {
            "sp_coeff": 2e-3 if spec.specialization else 0.0,
            "cp_coeff": 1e-3 if spec.specialization else 0.0,
            "metrics": True,
        },
        "data": {"domains": list(spec.domains)} if spec.domains else {"domains": None},
        "training": {
            "train_iters": spec.train_steps,
            "log_interval": spec.log_interval,
            "eval_interval": spec.eval_interval,
            "seed": spec.seed,
        },
    }
    config.update(spec.extra_config)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write("# SYNTHETIC run written by megatron_moe_spec.report.synthetic (simulated, not trained)\n")
        yaml.safe_dump(config, f, sort_keys=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic run directory (simulated, not trained).")
    parser.add_argument("out_dir")
    parser.add_argument("--name", default=None, help="run name (default: the directory's name)")
    parser.add_argument("--no-specialization", action="store_true", help="R_sp/R_cp off (a baseline)")
    parser.add_argument("--no-domains", action="store_true", help="data without domain labels")
    parser.add_argument("--no-val", action="store_true", help="no validation loss")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_synthetic_run(
        args.out_dir,
        name=args.name or os.path.basename(os.path.abspath(args.out_dir)),
        specialization=not args.no_specialization,
        domains=None if args.no_domains else ("code", "math", "prose"),
        eval_interval=None if args.no_val else 50,
        seed=args.seed,
    )
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
