"""Reading a run directory (docs/design.md, "Run directory") into a small ``Run`` object.

Four files are read: ``config.yaml`` (optional), ``metrics.jsonl`` (required),
``routing.jsonl`` (optional) and ``domains.json`` (optional: the data's domain names, written by the
training driver). Every key other than ``step`` is optional: a run without validation
has no ``val_lm_loss``, a run without R_sp has no ``specialization_loss``, the last MoE layer has no
``transition``, data without domain labels gives no ``expert_domain``.

``routing.jsonl`` can be large (E x E matrices per layer per logged step), so it is streamed: the
small ``tokens_per_expert`` vectors are kept for every step, the matrices only for the latest step
that carries them.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..run_records import METRICS_FILE, merge_by_step, read_jsonl

ROUTING_FILE = "routing.jsonl"
CONFIG_FILE = "config.yaml"
DOMAINS_FILE = "domains.json"

#: Auxiliary losses, in the order the report shows them (docs/design.md).
AUX_LOSSES = (
    "load_balancing_loss",
    "z_loss",
    "specialization_loss",
    "coupling_loss",
    "orthogonality_loss",
    "variance_loss",
)
#: The routing.jsonl matrices that are kept for the last step that has them.
MATRICES = ("transition", "similarity", "expert_domain")

_LAYER_KEY = re.compile(r"^(?P<name>.+)/layer_(?P<layer>\d+)$")


class RunDirError(Exception):
    """A RUN_DIR that cannot be reported on (missing, or without metrics)."""


@dataclass
class Run:
    """One run directory, read."""

    path: str
    name: str
    config: dict
    config_text: str
    metrics: List[dict]
    """metrics.jsonl records, sorted by step, one per step (records of the same step are merged,
    later values winning: a resumed run re-logs steps)."""
    tokens_per_expert: Dict[int, List[Tuple[int, np.ndarray]]] = field(default_factory=dict)
    """layer -> [(step, counts[E])] in step order, from routing.jsonl."""
    last_matrices: Dict[str, Dict[int, Tuple[int, np.ndarray]]] = field(default_factory=dict)
    """matrix name -> layer -> (step, matrix) of the latest step that carries it."""
    warnings: List[str] = field(default_factory=list)
    domains: Optional[List[str]] = None
    """Domain names (id = position) from ``RUN_DIR/domains.json``, when the run wrote one."""

    # ------------------------------------------------------------------ metrics
    def series(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
        """(steps, values) of every record that has ``key`` (a number; None -> NaN)."""
        steps, values = [], []
        for rec in self.metrics:
            if key in rec:
                steps.append(rec["step"])
                values.append(_to_float(rec[key]))
        return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)

    def has(self, key: str) -> bool:
        """True when some record logs ``key`` with a value (not null)."""
        return any(rec.get(key) is not None for rec in self.metrics)

    def metric_layers(self, name: str) -> List[int]:
        """Layers that log ``name/layer_i`` in metrics.jsonl, sorted."""
        layers = set()
        for rec in self.metrics:
            for key in rec:
                m = _LAYER_KEY.match(key)
                if m and m.group("name") == name:
                    layers.add(int(m.group("layer")))
        return sorted(layers)

    @functools.cached_property
    def moe_layers(self) -> List[int]:
        """Every MoE layer index seen in routing.jsonl or as ``*/layer_i`` in metrics.jsonl."""
        layers = set(self.tokens_per_expert)
        for per_layer in self.last_matrices.values():
            layers.update(per_layer)
        for rec in self.metrics:
            for key in rec:
                m = _LAYER_KEY.match(key)
                if m:
                    layers.add(int(m.group("layer")))
        return sorted(layers)

    @property
    def routing_layers(self) -> List[int]:
        """MoE layers that appear in routing.jsonl, sorted."""
        layers = set(self.tokens_per_expert)
        for per_layer in self.last_matrices.values():
            layers.update(per_layer)
        return sorted(layers)

    def next_moe_layer(self, layer: int) -> Optional[int]:
        """The MoE layer after ``layer`` (dense layers in between skipped), or None."""
        later = [l for l in self.moe_layers if l > layer]
        return later[0] if later else None

    def matrix(self, name: str, layer: int) -> Optional[Tuple[int, np.ndarray]]:
        return self.last_matrices.get(name, {}).get(layer)

    def tokens_matrix(self, layer: int) -> Tuple[np.ndarray, np.ndarray]:
        """(steps[S], counts[E x S]) for one layer; experts missing at a step count as NaN."""
        entries = self.tokens_per_expert.get(layer, [])
        if not entries:
            return np.zeros(0), np.zeros((0, 0))
        n_experts = max(len(c) for _, c in entries)
        out = np.full((n_experts, len(entries)), np.nan)
        for j, (_, counts) in enumerate(entries):
            out[: len(counts), j] = counts
        return np.asarray([s for s, _ in entries], dtype=float), out

    def domain_names(self, n_domains: int) -> List[str]:
        """Domain labels: ``RUN_DIR/domains.json`` (the training driver writes it), else the config
        (a list of ``n_domains`` strings under a key named ``domains`` or ``domain_names`` anywhere
        in it), else ``domain 0``, ``domain 1``, ..."""
        if self.domains is not None and len(self.domains) == n_domains:
            return list(self.domains)
        found = _find_domain_names(self.config, n_domains)
        return found if found else [f"domain {d}" for d in range(n_domains)]


# ---------------------------------------------------------------------- loading
def load_run(path: str) -> Run:
    """Read one run directory. Raises ``RunDirError`` with a message that names the problem."""
    if not os.path.exists(path):
        raise RunDirError(f"run directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise RunDirError(f"{path!r} is not a directory (expected a run directory)")
    metrics_path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(metrics_path):
        raise RunDirError(
            f"{path!r} has no {METRICS_FILE}: not a run directory, or the run has not logged a step yet"
        )

    warnings: List[str] = []
    metrics = merge_by_step(read_jsonl(metrics_path, warnings), warnings, metrics_path)
    if not metrics:
        raise RunDirError(f"{metrics_path} contains no metrics records")

    config, config_text = {}, ""
    config_path = os.path.join(path, CONFIG_FILE)
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config_text = f.read()
        try:
            import yaml

            loaded = yaml.safe_load(config_text)
            config = loaded if isinstance(loaded, dict) else {}
        except Exception as exc:  # a broken config must not stop the report
            warnings.append(f"{config_path}: not readable as YAML ({exc}); shown as text only")
    else:
        warnings.append(f"{path}: no {CONFIG_FILE}")

    run = Run(
        path=os.path.abspath(path),
        name=run_name(path, config),
        config=config,
        config_text=config_text,
        metrics=metrics,
        warnings=warnings,
    )
    run.domains = _read_domains(os.path.join(path, DOMAINS_FILE), warnings)
    routing_path = os.path.join(path, ROUTING_FILE)
    if os.path.isfile(routing_path):
        _read_routing(routing_path, run)
    return run


def load_runs(paths: List[str]) -> List[Run]:
    """Read several run directories; names are made unique (the parent folder is prepended to
    clashing names, then a counter)."""
    runs = [load_run(p) for p in paths]
    seen: Dict[str, int] = {}
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            parent = os.path.basename(os.path.dirname(run.path.rstrip(os.sep)))
            run.name = f"{parent}/{run.name}" if parent else run.name
    for run in runs:
        base = run.name
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            run.name = f"{base} ({seen[base]})"
    return runs


def run_name(path: str, config: dict) -> str:
    """The run's name: ``name`` / ``run_name`` / ``experiment_name`` from the config (top level,
    or under ``run:`` / ``experiment:`` / ``logging:``), else the directory's name."""
    candidates = [config]
    for section in ("run", "experiment", "logging"):
        if isinstance(config.get(section), dict):
            candidates.append(config[section])
    for section in candidates:
        for key in ("name", "run_name", "experiment_name"):
            value = section.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return os.path.basename(os.path.abspath(path).rstrip(os.sep)) or path


# ---------------------------------------------------------------------- helpers
def _to_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _read_routing(path: str, run: Run) -> None:
    tokens: Dict[int, Dict[int, np.ndarray]] = {}
    last: Dict[str, Dict[int, Tuple[int, np.ndarray]]] = {name: {} for name in MATRICES}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                step = int(rec["step"])
                layers = rec.get("layers") or {}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                run.warnings.append(f"{path}:{lineno}: skipped a malformed line")
                continue
            for key, entry in layers.items():
                m = re.fullmatch(r"(?:layer_?)?(\d+)", str(key))
                if m:
                    layer = int(m.group(1))
                else:
                    run.warnings.append(f"{path}:{lineno}: skipped layer key {key!r}")
                    continue
                if not isinstance(entry, dict):
                    continue
                if entry.get("tokens_per_expert") is not None:
                    tokens.setdefault(layer, {})[step] = np.asarray(entry["tokens_per_expert"], dtype=float)
                for name in MATRICES:
                    value = entry.get(name)
                    if value is None:
                        continue
                    arr = np.asarray(value, dtype=float)
                    if arr.ndim != 2 or arr.size == 0:
                        run.warnings.append(f"{path}:{lineno}: layer {layer} {name} is not a 2-D matrix")
                        continue
                    prev = last[name].get(layer)
                    if prev is None or step >= prev[0]:
                        last[name][layer] = (step, arr)
    run.tokens_per_expert = {
        layer: [(s, per_step[s]) for s in sorted(per_step)] for layer, per_step in tokens.items()
    }
    run.last_matrices = {name: per_layer for name, per_layer in last.items() if per_layer}


def _read_domains(path: str, warnings: List[str]) -> Optional[List[str]]:
    """The names of ``domains.json`` (``{"domains": [names...]}``); None when absent or unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            names = json.load(f)["domains"]
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return list(names)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    warnings.append(f"{path}: not a {{\"domains\": [names...]}} file; domains shown by number")
    return None


def _find_domain_names(node, n: int):
    if isinstance(node, dict):
        for key in ("domain_names", "domains"):
            value = node.get(key)
            if isinstance(value, list) and len(value) == n and all(isinstance(v, str) for v in value):
                return list(value)
            if isinstance(value, dict) and len(value) == n and all(isinstance(k, str) for k in value):
                return list(value)
        for value in node.values():
            found = _find_domain_names(value, n)
            if found:
                return found
    elif isinstance(node, list):
        for value in node:
            found = _find_domain_names(value, n)
            if found:
                return found
    return None

