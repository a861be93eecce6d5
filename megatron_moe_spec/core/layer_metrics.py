"""Per-layer routing metrics, accumulated over micro-batches and reduced over all ranks explicitly.

Each MoE layer adds one micro-batch's routing (and z, when captured) to its sufficient statistics
(``megatron_moe_spec.metrics``: sums and counts). ``report()`` reduces them with ONE all-reduce (SUM)
over the whole world and finalizes: tokens are distinct across the TP(SP) x CP x DP ranks at the MoE
input and each layer lives on one pipeline stage, so the world sum is the statistic of the whole
global batch. Every rank must call ``report()`` (it is a collective); each rank pre-creates the
statistics of every MoE layer of the model (``register_layers``), so shapes agree everywhere.

Token domains (for the expert x domain statistic) are set per micro-batch by the training driver
with :func:`set_token_domains` ([S, B] or [B, S] ids of this rank's micro-batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional

import torch

from megatron_moe_spec import metrics as M


@dataclass
class _LayerStats:
    routing: M.RoutingStats
    similarity: M.SimilarityStats
    pathway: Optional[M.PathwayStats] = None
    domain: Optional[M.DomainStats] = None


@dataclass
class _Registry:
    layers: Dict[int, _LayerStats] = field(default_factory=dict)
    next_moe_layer: Dict[int, int] = field(default_factory=dict)
    num_domains: int = 0
    domains_SB: Optional[torch.Tensor] = None  # this rank's current micro-batch, [S_local * B]


_REGISTRY = _Registry()


def register_layers(moe_layer_numbers: Iterable[int], num_experts: int, num_domains: int = 0,
                    eps: float = 1e-6) -> None:
    """Create the statistics of every MoE layer of the model (1-based megatron layer numbers)."""
    numbers = sorted(moe_layer_numbers)
    _REGISTRY.layers.clear()
    _REGISTRY.num_domains = num_domains
    _REGISTRY.next_moe_layer = dict(zip(numbers[:-1], numbers[1:]))
    for n in numbers:
        stats = _LayerStats(M.RoutingStats(num_experts), M.SimilarityStats(num_experts, eps=eps))
        if n in _REGISTRY.next_moe_layer:
            # Transition from this layer's top-1 to the next MoE layer's top-1.
            stats.pathway = M.PathwayStats(num_experts, num_experts)
        if num_domains:
            stats.domain = M.DomainStats(num_experts, num_domains)
        _REGISTRY.layers[n] = stats


def registered_layers():
    return sorted(_REGISTRY.layers)


def set_token_domains(domain: Optional[torch.Tensor], sequence_parallel_rank: int = 0,
                      sequence_parallel_size: int = 1) -> None:
    """Domain id of every token of the current micro-batch, as the MoE layers see them.

    ``domain``: [B, S] (the data layout). MoE layers see tokens as [S, B] flattened, split over the
    sequence-parallel ranks along S; pass this rank's TP rank and size when sequence parallel is on.
    """
    if domain is None:
        _REGISTRY.domains_SB = None
        return
    d_SB = domain.t()
    chunk = d_SB.shape[0] // sequence_parallel_size
    d_SB = d_SB[sequence_parallel_rank * chunk:(sequence_parallel_rank + 1) * chunk]
    _REGISTRY.domains_SB = d_SB.reshape(-1)


@torch.no_grad()
def update(layer_number: int, record, z_TKF: Optional[torch.Tensor], incoming=None) -> None:
    """Add one micro-batch of one layer (called by the MoE layer)."""
    stats = _REGISTRY.layers.get(layer_number)
    if stats is None:
        return
    valid = record.valid_T
    top1_as_idx = record.top1_T.unsqueeze(1)
    stats.routing.update(record.probs_TE.detach(), record.topk_idx_TK, valid)
    if z_TKF is not None:
        stats.similarity.update(z_TKF.detach(), valid, record.topk_idx_TK)
    if incoming is not None:
        previous = _REGISTRY.layers.get(incoming.layer_number)
        if previous is not None and previous.pathway is not None:
            previous.pathway.update(incoming.top1_T.unsqueeze(1), top1_as_idx, valid & incoming.valid_T)
    if stats.domain is not None and _REGISTRY.domains_SB is not None:
        domains = _REGISTRY.domains_SB.to(record.top1_T.device)
        if domains.numel() == record.top1_T.numel():
            # -1 = no domain (e.g. padding, or a dataset without labels): not counted.
            stats.domain.update(top1_as_idx, domains.clamp(min=0), valid & (domains >= 0))


def reset() -> None:
    for stats in _REGISTRY.layers.values():
        for s in (stats.routing, stats.similarity, stats.pathway, stats.domain):
            if s is not None:
                s.reset_()


def _all_stats():
    for n in sorted(_REGISTRY.layers):
        stats = _REGISTRY.layers[n]
        for s in (stats.routing, stats.similarity, stats.pathway, stats.domain):
            if s is not None:
                yield s


def report(group=None) -> Dict[str, object]:
    """Reduce (SUM over ``group``, default the world) and finalize; then reset. A collective.

    Returns ``{"routing_entropy/layer_i": float, ..., "routing_entropy": mean over layers, ...}``
    with i = layer_number - 1 (megatron's tracker convention), plus ``"matrices": {i: {...}}`` with
    ``tokens_per_expert``, ``transition``, ``similarity``, ``expert_domain`` as lists (routing.jsonl).
    """
    stats_list = list(_all_stats())
    if not stats_list:
        return {}
    flat = torch.cat([s.as_tensor() for s in stats_list])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        flat = flat.to(_collective_device())
        torch.distributed.all_reduce(flat, group=group)
        flat = flat.cpu()
    offset = 0
    for s in stats_list:
        size = s.as_tensor().numel()
        s.load_tensor_(flat[offset:offset + size].to(s.as_tensor().device))
        offset += size

    out: Dict[str, object] = {}
    sums: Dict[str, list] = {}
    matrices: Dict[int, dict] = {}
    for n, stats in sorted(_REGISTRY.layers.items()):
        i = n - 1
        values = {}
        routing = stats.routing.finalize()
        tokens_per_expert = routing.pop("tokens_per_expert")
        values.update(routing)
        similarity = stats.similarity.finalize()
        values["activation_similarity"] = similarity["activation_similarity"]
        layer_matrices = {"tokens_per_expert": tokens_per_expert.tolist(),
                          "similarity": similarity["similarity"].tolist()}
        # Pairs never observed together (adjacent MoE layers on different pipeline stages, whose
        # routing does not travel across the boundary) are left out rather than reported as 0.
        if stats.pathway is not None and float(stats.pathway.transition_EF.sum()) > 0:
            pathway = stats.pathway.finalize()
            values["pathway_nmi"] = pathway["pathway_nmi"]
            layer_matrices["transition"] = pathway["transition"].tolist()
        if stats.domain is not None and float(stats.domain.expert_domain_ED.sum()) > 0:
            domain = stats.domain.finalize()
            values["domain_mi"] = domain["domain_mi"]
            layer_matrices["expert_domain"] = domain["expert_domain"].tolist()
        for name, value in values.items():
            out[f"{name}/layer_{i}"] = value
            sums.setdefault(name, []).append(value)
        matrices[i] = layer_matrices
    for name, values in sums.items():
        out[name] = sum(values) / len(values)
    out["matrices"] = matrices
    reset()
    return out


def _collective_device():
    return torch.cuda.current_device() if torch.cuda.is_available() else torch.device("cpu")
