"""Named profiler ranges for the work megatron-moe-spec adds to a training step.

Three forward regions are wrapped in ``torch.profiler.record_function`` ranges, so they show up by
name in ``torch.profiler`` traces (and, under ``torch.autograd.profiler.emit_nvtx``, as NVTX ranges in
Nsight Systems):

- ``moe_spec/routing_record``: the router's record of the micro-batch (pre-top-k p, top-k indices,
  valid tokens; ``[T, E]`` work);
- ``moe_spec/ungate_exchange``: dividing the gate out of the captured expert rows and bringing each
  token's k rows side by side (the EP exchange);
- ``moe_spec/losses``: R_sp, R_cp, L_o, L_v and the metrics' update, from the rows and the record.

The ranges do not nest, so their times add up. In backward, the custom autograd functions appear
under their own node names (:data:`BACKWARD_NODES`); the backward of the other ops of these regions
(elementwise and ``[T, E]`` ops) carries megatron-wide op names and is not attributed, so
:func:`attributed_seconds` is a lower bound of the added time. The capture of z itself is two
forward hooks inside megatron's expert computation and costs no op.

A range costs one profiler call when no profiler runs (microseconds per MoE layer and micro-batch).
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch

PREFIX = "moe_spec/"
ROUTING_RECORD = PREFIX + "routing_record"
UNGATE_EXCHANGE = PREFIX + "ungate_exchange"
LOSSES = PREFIX + "losses"
FORWARD_RANGES = (ROUTING_RECORD, UNGATE_EXCHANGE, LOSSES)
# Backward nodes of this package's autograd functions (expert_capture._Ungate, token_exchange._RowsToSlots,
# losses._TokenGram, stage_transport.InjectGradient), as the autograd engine names them in a profile.
BACKWARD_NODES = ("_UngateBackward", "_RowsToSlotsBackward", "_TokenGramBackward", "InjectGradientBackward")


def span(name: str):
    """``record_function(name)``: a named range (one of :data:`FORWARD_RANGES`)."""
    return torch.profiler.record_function(name)


def attributed_seconds(events: Iterable[Tuple[str, float]]) -> Dict[str, float]:
    """Seconds per forward range and backward node, from ``(key, cpu_time_total_us)`` pairs.

    ``events``: a profile's aggregated events, e.g. ``(e.key, e.cpu_time_total)`` for ``e`` in
    ``prof.key_averages()`` (times in microseconds, inclusive of child ops). A backward node's key is
    ``"autograd::engine::evaluate_function: <node>"`` (or the bare node name). Returns
    ``{range or node: seconds}`` for those present, plus ``"total"``, their sum.
    """
    ranges: Dict[str, float] = {}
    engine: Dict[str, float] = {}  # "evaluate_function: <node>": the node and its children
    bare: Dict[str, float] = {}  # "<node>" alone (nested in the former when both are recorded)
    for key, us in events:
        node = key.rsplit(": ", 1)[-1]
        if key in FORWARD_RANGES:
            ranges[key] = ranges.get(key, 0.0) + us * 1e-6
        elif key.startswith("autograd::engine::evaluate_function") and node in BACKWARD_NODES:
            engine[node] = engine.get(node, 0.0) + us * 1e-6
        elif key in BACKWARD_NODES:
            bare[key] = bare.get(key, 0.0) + us * 1e-6
    out = {**ranges, **bare, **engine}
    out["total"] = sum(out.values())
    return out
