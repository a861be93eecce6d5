"""``SpecializationRouter``: megatron's ``TopKRouter`` that also records what it decided.

It routes exactly as ``TopKRouter`` (same gates, same routing map, same aux losses); when the MoE
layer asks for it (``record_routing = True``), it also keeps a :class:`RoutingRecord` of the
micro-batch: the pre-top-k distribution p recomputed from the logits with the configured score
function (megatron returns only the post-top-k gates), the gates, the routing map and the valid
tokens. The MoE layer takes the record right after routing (``pop_record``).
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_moe_spec.core import profiling
from megatron_moe_spec.core.routing_record import (
    RoutingRecord,
    pre_topk_distribution,
    topk_indices_from_map,
    valid_tokens,
)


class SpecializationRouter(TopKRouter):
    """``TopKRouter`` + a per-micro-batch :class:`RoutingRecord` for the specialization losses."""

    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.record_routing = False
        self._record: Optional[RoutingRecord] = None

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.record_routing:
            with profiling.span(profiling.ROUTING_RECORD):
                logits_TE = logits.reshape(-1, self.config.num_moe_experts)
                gates_TE = probs.reshape(-1, self.config.num_moe_experts)
                padding_T = padding_mask.reshape(-1) if padding_mask is not None else None
                masked_gates = torch.where(routing_map, gates_TE.detach(), torch.full_like(gates_TE, -1.0))
                self._record = RoutingRecord(
                    probs_TE=pre_topk_distribution(logits_TE, self.score_function),
                    gates_TE=gates_TE,
                    routing_map_TE=routing_map,
                    valid_T=valid_tokens(routing_map, self.topk, padding_T),
                    topk_idx_TK=topk_indices_from_map(routing_map, self.topk),
                    top1_T=masked_gates.argmax(dim=1),
                    not_padding_T=(~padding_T.bool() if padding_T is not None
                                   else torch.ones_like(routing_map[:, 0], dtype=torch.bool)),
                )
        return probs, routing_map

    def pop_record(self) -> Optional[RoutingRecord]:
        record, self._record = self._record, None
        return record
