"""What a run reports (each record averages the steps since the previous one, see loop.py): a console line (and a progress bar), RUN_DIR/metrics.jsonl, routing.jsonl,
TensorBoard and, when configured, Weights & Biases. Only the writer rank (rank 0, after the
reductions) touches files; the other ranks get a ``Reporter`` that does nothing.

metrics.jsonl / routing.jsonl follow docs/design.md. On resume, records after the resumed iteration
(written by the interrupted run after its last checkpoint) are dropped, so each step appears once.
Non-finite numbers are written as null (strict JSON).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, Optional

# The scalars of the console line, in order (when present).
CONSOLE_METRICS = ("routing_entropy", "activation_similarity", "load_cv", "domain_mi")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return _finite(obj)
    return obj


DOMAINS_FILE = "domains.json"


def write_domain_names(run_dir: str, names) -> Optional[str]:
    """Write ``RUN_DIR/domains.json`` = ``{"domains": [names...]}`` (id = position; the corpus's own
    format, docs/data.md) so the report can label domains; None (nothing written) without names."""
    if not names:
        return None
    path = os.path.join(run_dir, DOMAINS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"domains": [str(n) for n in names]}, f)
        f.write("\n")
    os.replace(tmp, path)
    return path


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keep the records with ``step <= last_step`` (atomically)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    if len(kept) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def tensorboard_tag(name: str) -> str:
    """Megatron-LM style tags: ``lm loss``, ``lm loss validation``, ``learning-rate``, MoE losses under
    ``moe/<name>`` (per layer ``moe/<name>_layer_<i>``), routing metrics under ``routing/``; the
    per-domain validation and test losses under ``lm loss validation/<domain>``, ``lm loss test/<domain>``."""
    fixed = {"lm_loss": "lm loss", "val_lm_loss": "lm loss validation", "test_lm_loss": "lm loss test",
             "lr": "learning-rate",
             "tokens_per_sec": "throughput/tokens-per-sec", "step_time_s": "iteration-time",
             "grad_norm": "grad-norm"}
    if name in fixed:
        return fixed[name]
    head, _, domain = name.partition("/")
    if head in ("val_lm_loss", "test_lm_loss"):
        return f"{fixed[head]}/{domain}"
    from megatron_moe_spec.training.tracker import _LB_NAMES

    base, _, layer = name.partition("/")
    group = "moe" if base in set(_LB_NAMES.values()) | {"z_loss"} or base.endswith("_loss") else "routing"
    return f"{group}/{base}_{layer}" if layer else f"{group}/{base}"


class Reporter:
    """Writes one record per logged step. Create with :func:`make_reporter`."""

    def __init__(self, cfg, start_iteration: int, aux_names, writer: bool):
        self.cfg = cfg
        self.writer = writer
        self.aux_names = list(aux_names)
        self.run_dir = cfg.logging.run_dir
        self.tb = None
        self.wandb = None
        self.bar = None
        if not writer:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        self.routing_path = os.path.join(self.run_dir, "routing.jsonl")
        for path in (self.metrics_path, self.routing_path):
            truncate_jsonl(path, start_iteration)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=os.path.join(self.run_dir, "tensorboard"),
                                    purge_step=start_iteration + 1 if start_iteration else None)
        if cfg.logging.wandb_project:
            import wandb  # checked at start-up (commands/train.py)

            self.wandb = wandb.init(project=cfg.logging.wandb_project, config=cfg.to_dict(),
                                    name=os.path.basename(os.path.normpath(self.run_dir)),
                                    dir=self.run_dir, resume="allow")
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.training.train_iters, initial=start_iteration, unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def print(self, text: str) -> None:
        if not self.writer:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: Dict[str, float], matrices: Optional[dict] = None) -> None:
        if not self.writer:
            return
        step = record["step"]
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        if matrices:
            with open(self.routing_path, "a") as f:
                f.write(json.dumps(_jsonable({"step": step, "layers": matrices})) + "\n")
        if self.tb is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(tensorboard_tag(name), value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        self.print(self.console_line(record))

    def console_line(self, r: Dict[str, float]) -> str:
        parts = [f"step {r['step']:>{len(str(self.cfg.training.train_iters))}}/{self.cfg.training.train_iters}",
                 f"lm loss {r['lm_loss']:.4f}"]
        if "val_lm_loss" in r:
            parts.append(f"val {r['val_lm_loss']:.4f}")
        if "test_lm_loss" in r:
            parts.append(f"test {r['test_lm_loss']:.4f}")
        parts.append(f"lr {r['lr']:.2e}")
        for name in self.aux_names:
            if name in r:
                parts.append(f"{name.replace('_loss', '')} {r[name]:.4g}")
        for name in CONSOLE_METRICS:
            if name in r:
                parts.append(f"{name} {r[name]:.3f}")
        parts.append(f"{r['tokens_per_sec']:,.0f} tok/s")
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Throughput:
    """Tokens per second and mean step time since the last log."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def read(self) -> Dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        out = {"tokens_per_sec": self.tokens_per_step * steps / elapsed, "step_time_s": elapsed / steps}
        self.reset()
        return out
