"""Routing and specialization metrics (spec section "Metrics"), pure PyTorch, no gradients.

Every metric is built on *sufficient statistics*: sums and counts held in float64 tensors, which
add exactly (counts) or to round-off (sums) across micro-batches and ranks. The pattern, OLMo-core
style, keeps every reduction explicit:

    stats = RoutingStats(num_experts)
    for micro_batch in ...:
        stats.update(probs_TE, topk_idx_TK, valid_T)           # local sums and counts
    stats.reduce_(lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=dp_group))
    values = stats.finalize()                                   # ratios, logs: only here

``as_tensor()`` returns the statistics as one flat float64 tensor (fixed field order),
``load_tensor_(flat)`` writes one back, ``reduce_(fn)`` = both around an in-place ``fn``, and
``merge_(other)`` adds another object's statistics. The convenience functions
(``routing_metrics`` ...) are one ``update`` + ``finalize``.

Decisions the spec leaves open (also in docs/losses.md):
- "top-1" is slot 0 of ``topk_idx`` (slots are in top-k order).
- load CV uses the population standard deviation of the tokens-per-expert counts.
- co-activation: the mean over unordered expert pairs e < v whose union #{t: e or v in A_t} is
  non-empty; pairs never chosen at all are left out of the mean (0 if no pair qualifies).
- pathway NMI = I(X; Y) / ((H(X) + H(Y)) / 2) (arithmetic mean, as scikit-learn's default);
  1 when both layers send every token to a single expert (H(X) = H(Y) = 0), 0 with no token.
- With no valid token every mean is 0 (dead_experts is then E: every count is 0).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch

from .losses import _gram_rows
from .losses import _valid_or_all as _valid_weights

__all__ = [
    "RoutingStats",
    "SimilarityStats",
    "PathwayStats",
    "DomainStats",
    "routing_metrics",
    "activation_similarity",
    "expert_similarity_matrix",
    "pathway_metrics",
    "domain_specialization",
]

_STAT_DTYPE = torch.float64


def _safe_idx(idx: torch.Tensor, valid_T: torch.Tensor) -> torch.Tensor:
    """Masked tokens' expert ids (possibly -1 or garbage) replaced by 0; they get weight 0."""
    idx = idx.long()
    mask = valid_T.view(-1, *([1] * (idx.dim() - 1)))
    return torch.where(mask, idx, torch.zeros_like(idx))


def _entropy_of_counts(counts: torch.Tensor) -> torch.Tensor:
    total = counts.sum()
    p = counts / total.clamp(min=1)
    return -torch.xlogy(p, p).sum()


def _mutual_information(joint_XY: torch.Tensor):
    """I(X;Y), H(X), H(Y) in nats from a joint count matrix [X, Y] (float64)."""
    total = joint_XY.sum().clamp(min=1)
    p_XY = joint_XY / total
    p_X, p_Y = p_XY.sum(1), p_XY.sum(0)
    h_x = -torch.xlogy(p_X, p_X).sum()
    h_y = -torch.xlogy(p_Y, p_Y).sum()
    h_xy = -torch.xlogy(p_XY, p_XY).sum()
    return (h_x + h_y - h_xy).clamp(min=0), h_x, h_y


class _Stats:
    """Base: a fixed, ordered tuple of float64 tensor fields that reduce by summation."""

    _fields: tuple = ()

    def _init_fields(self, shapes: Dict[str, tuple], device) -> None:
        self._fields = tuple(shapes)
        for name, shape in shapes.items():
            setattr(self, name, torch.zeros(shape, dtype=_STAT_DTYPE, device=device))

    def as_tensor(self) -> torch.Tensor:
        """All statistics as one flat float64 tensor (a copy), in ``_fields`` order."""
        return torch.cat([getattr(self, f).reshape(-1) for f in self._fields])

    def load_tensor_(self, flat: torch.Tensor):
        """Overwrite the statistics from a flat tensor made by ``as_tensor`` (after a reduce)."""
        sizes = [getattr(self, f).numel() for f in self._fields]
        if flat.numel() != sum(sizes):
            raise ValueError(f"flat tensor has {flat.numel()} elements, expected {sum(sizes)}")
        for f, part in zip(self._fields, torch.split(flat.reshape(-1), sizes)):
            getattr(self, f).copy_(part.view_as(getattr(self, f)))
        return self

    def reduce_(self, fn: Callable[[torch.Tensor], object]):
        """Apply an in-place SUM reduction ``fn(flat)`` (e.g. ``dist.all_reduce``) to the stats."""
        flat = self.as_tensor()
        fn(flat)
        return self.load_tensor_(flat)

    def merge_(self, other: "_Stats"):
        """Add another object's statistics (same type and sizes): micro-batch accumulation."""
        if type(other) is not type(self) or other._fields != self._fields:
            raise TypeError("can only merge statistics of the same kind")
        for f in self._fields:
            getattr(self, f).add_(getattr(other, f))
        return self

    def reset_(self):
        for f in self._fields:
            getattr(self, f).zero_()
        return self


class RoutingStats(_Stats):
    """Router metrics of one MoE layer: entropy, top-k mass, load, token-expert MI, co-activation.

    Statistics (float64): ``num_tokens`` [1]; ``sum_entropy`` [1] (sum_t H(p_t), nats);
    ``sum_topk_mass`` [1] (sum_t M_t); ``sum_probs_E`` [E] (sum_t p_t);
    ``tokens_per_expert_E`` [E] (c_e); ``pair_counts_EE`` [E, E] (#{t: e and v in A_t}, e != v,
    symmetric, zero diagonal).
    """

    def __init__(self, num_experts: int, device=None):
        self.num_experts = num_experts
        E = num_experts
        self._init_fields({"num_tokens": (1,), "sum_entropy": (1,), "sum_topk_mass": (1,),
                           "sum_probs_E": (E,), "tokens_per_expert_E": (E,),
                           "pair_counts_EE": (E, E)}, device)

    @torch.no_grad()
    def update(self, probs, topk_idx, valid=None):
        """Add one batch: ``probs_TE`` [T, E] pre-top-k distribution, ``topk_idx_TK`` [T, k],
        ``valid_T`` bool [T]."""
        T, E = probs.shape
        if E != self.num_experts:
            raise ValueError(f"probs has E={E}, stats were built for {self.num_experts}")
        dev = self.sum_probs_E.device
        valid_T = _valid_weights(valid, T, probs.device)
        p_TE = torch.where(valid_T[:, None], probs.detach().float(), torch.zeros((), device=probs.device))
        idx_TK = _safe_idx(topk_idx, valid_T)
        K = idx_TK.shape[1]
        w_T = valid_T.to(_STAT_DTYPE)
        self.num_tokens += w_T.sum().to(dev)
        self.sum_entropy += (-torch.xlogy(p_TE, p_TE).sum(1)).to(_STAT_DTYPE).sum().to(dev)
        self.sum_topk_mass += p_TE.gather(1, idx_TK).sum(1).to(_STAT_DTYPE).sum().to(dev)
        self.sum_probs_E += p_TE.to(_STAT_DTYPE).sum(0).to(dev)
        w_TK = w_T[:, None].expand(T, K)
        self.tokens_per_expert_E.index_add_(0, idx_TK.reshape(-1).to(dev), w_TK.reshape(-1).to(dev))
        # Ordered slot pairs (i, j), i != j, of every token: flat index e * E + v.
        off_diag_KK = ~torch.eye(K, dtype=torch.bool, device=idx_TK.device)
        flat_TKK = idx_TK[:, :, None] * E + idx_TK[:, None, :]
        w_TKK = w_T[:, None, None].expand(T, K, K)
        self.pair_counts_EE.view(-1).index_add_(
            0, flat_TKK[:, off_diag_KK].reshape(-1).to(dev), w_TKK[:, off_diag_KK].reshape(-1).to(dev))
        return self

    @torch.no_grad()
    def finalize(self) -> dict:
        """-> {routing_entropy, topk_mass, load_cv, max_vio, dead_experts, token_expert_mi,
        coactivation: float; tokens_per_expert: float64 tensor [E]}."""
        E = self.num_experts
        n = self.num_tokens[0].clamp(min=1)
        mean_entropy = self.sum_entropy[0] / n
        routing_entropy = mean_entropy / math.log(E) if E > 1 else torch.zeros_like(n)
        topk_mass = self.sum_topk_mass[0] / n
        c_E = self.tokens_per_expert_E
        mean_c = c_E.mean()
        has_load = mean_c > 0
        load_cv = torch.where(has_load, c_E.std(unbiased=False) / mean_c.clamp(min=1e-30), 0.0)
        max_vio = torch.where(has_load, c_E.max() / mean_c.clamp(min=1e-30) - 1, 0.0)
        dead = (c_E == 0).sum().to(_STAT_DTYPE)
        p_mean_E = self.sum_probs_E / n
        token_expert_mi = torch.where(self.num_tokens[0] > 0,
                                      -torch.xlogy(p_mean_E, p_mean_E).sum() - mean_entropy, 0.0)
        both_EE = self.pair_counts_EE
        union_EE = c_E[:, None] + c_E[None, :] - both_EE
        pair_EE = torch.ones(E, E, dtype=torch.bool, device=c_E.device).triu(1) & (union_EE > 0)
        ratio = torch.where(pair_EE, both_EE / union_EE.clamp(min=1), 0.0)
        coactivation = ratio.sum() / pair_EE.sum().clamp(min=1)
        names = ("routing_entropy", "topk_mass", "load_cv", "max_vio", "dead_experts",
                 "token_expert_mi", "coactivation")
        values = torch.stack([routing_entropy, topk_mass, load_cv, max_vio, dead,
                              token_expert_mi, coactivation]).tolist()  # one host sync
        out = dict(zip(names, values))
        out["dead_experts"] = int(out["dead_experts"])
        out["tokens_per_expert"] = c_E.clone()
        return out


class SimilarityStats(_Stats):
    """Activation similarity: mean |cos(z_t,e, z_t,v)| over co-activated pairs (e < v in A_t).

    Statistics: ``num_pairs`` [1], ``sum_abs_cos`` [1]; with ``num_experts`` also the expert-pair
    matrices ``pair_abs_cos_EE`` and ``pair_counts_EE`` [E, E] (symmetric, both orders added,
    zero diagonal), which need ``topk_idx`` in ``update``. cos uses the spec's eps convention.
    """

    def __init__(self, num_experts: Optional[int] = None, device=None, eps: float = 1e-6):
        self.num_experts, self.eps = num_experts, eps
        shapes = {"num_pairs": (1,), "sum_abs_cos": (1,)}
        if num_experts is not None:
            shapes.update(pair_abs_cos_EE=(num_experts, num_experts),
                          pair_counts_EE=(num_experts, num_experts))
        self._init_fields(shapes, device)

    @torch.no_grad()
    def update(self, z, valid=None, topk_idx=None):
        """``z_TKF`` [T, k, F] (any float dtype, fp32 accumulation, O(T k^2) extra memory);
        ``valid_T`` bool [T]; ``topk_idx_TK`` [T, k] (required when tracking the matrix)."""
        T, K, _ = z.shape
        dev = self.num_pairs.device
        valid_T = _valid_weights(valid, T, z.device)
        G_TKK = _gram_rows(z.detach(), None, torch.float32 if z.dtype != torch.float64 else torch.float64)
        norm_TK = torch.diagonal(G_TKK, dim1=1, dim2=2).clamp(min=self.eps ** 2).sqrt()
        abs_cos_TKK = (G_TKK / (norm_TK[:, :, None] * norm_TK[:, None, :])).abs().to(_STAT_DTYPE)
        abs_cos_TKK = torch.where(valid_T[:, None, None], abs_cos_TKK, 0.0)
        upper_KK = torch.ones(K, K, dtype=torch.bool, device=z.device).triu(1)
        self.num_pairs += (valid_T.to(_STAT_DTYPE).sum() * (K * (K - 1) // 2)).to(dev)
        self.sum_abs_cos += abs_cos_TKK[:, upper_KK].sum().to(dev)
        if self.num_experts is not None:
            if topk_idx is None:
                raise ValueError("SimilarityStats(num_experts=...) needs topk_idx in update()")
            E = self.num_experts
            idx_TK = _safe_idx(topk_idx.to(z.device), valid_T)
            off_diag_KK = ~torch.eye(K, dtype=torch.bool, device=z.device)
            flat = (idx_TK[:, :, None] * E + idx_TK[:, None, :])[:, off_diag_KK].reshape(-1).to(dev)
            w = valid_T[:, None, None].expand(T, K, K)[:, off_diag_KK].reshape(-1).to(_STAT_DTYPE)
            self.pair_abs_cos_EE.view(-1).index_add_(0, flat, abs_cos_TKK[:, off_diag_KK].reshape(-1).to(dev))
            self.pair_counts_EE.view(-1).index_add_(0, flat, w.to(dev))
        return self

    @torch.no_grad()
    def finalize(self) -> dict:
        """-> {activation_similarity: float (0 with no pair); similarity: [E, E] float64 tensor
        of mean |cos| per expert pair, 0 where never co-activated (only with num_experts)}."""
        out = {"activation_similarity":
               (self.sum_abs_cos[0] / self.num_pairs[0].clamp(min=1)).item()}
        if self.num_experts is not None:
            out["similarity"] = torch.where(self.pair_counts_EE > 0,
                                            self.pair_abs_cos_EE / self.pair_counts_EE.clamp(min=1), 0.0)
        return out


class PathwayStats(_Stats):
    """Pathway consistency between MoE layer l and the next MoE layer l'.

    Statistic: ``transition_EF`` [E, E'] counts of (top-1 at l, top-1 at l') over valid tokens
    (top-1 = slot 0). NMI = I / ((H(l) + H(l')) / 2), arithmetic-mean normalization.
    """

    def __init__(self, num_experts: int, next_num_experts: Optional[int] = None, device=None):
        self.num_experts = num_experts
        self.next_num_experts = num_experts if next_num_experts is None else next_num_experts
        self._init_fields({"transition_EF": (self.num_experts, self.next_num_experts)}, device)

    @torch.no_grad()
    def update(self, topk_idx, next_topk_idx, valid=None):
        """``topk_idx_TK`` [T, k] of layer l, ``next_topk_idx_TK`` [T, k'] of l', ``valid_T``."""
        T = topk_idx.shape[0]
        dev = self.transition_EF.device
        valid_T = _valid_weights(valid, T, topk_idx.device)
        top1_T = _safe_idx(topk_idx[:, 0], valid_T)
        next_top1_T = _safe_idx(next_topk_idx[:, 0].to(topk_idx.device), valid_T)
        flat_T = top1_T * self.next_num_experts + next_top1_T
        self.transition_EF.view(-1).index_add_(0, flat_T.to(dev), valid_T.to(_STAT_DTYPE).to(dev))
        return self

    @torch.no_grad()
    def finalize(self) -> dict:
        """-> {pathway_nmi: float in [0, 1]; transition: [E, E'] float64 counts}."""
        counts = self.transition_EF
        mi, h_x, h_y = _mutual_information(counts)
        denom = (h_x + h_y) / 2
        nmi = torch.where(denom > 0, mi / denom.clamp(min=1e-300),
                          (counts.sum() > 0).to(_STAT_DTYPE))
        return {"pathway_nmi": nmi.clamp(0, 1).item(), "transition": counts.clone()}


class DomainStats(_Stats):
    """Domain specialization: MI (nats) between the top-1 expert (slot 0) and the domain label.

    Statistic: ``expert_domain_ED`` [E, D] counts of (top-1 expert, domain) over valid tokens.
    """

    def __init__(self, num_experts: int, num_domains: int, device=None):
        self.num_experts, self.num_domains = num_experts, num_domains
        self._init_fields({"expert_domain_ED": (num_experts, num_domains)}, device)

    @torch.no_grad()
    def update(self, topk_idx, domain, valid=None):
        """``topk_idx_TK`` [T, k]; ``domain_T`` int [T] in [0, D); ``valid_T`` bool [T]."""
        T = topk_idx.shape[0]
        dev = self.expert_domain_ED.device
        valid_T = _valid_weights(valid, T, topk_idx.device)
        top1_T = _safe_idx(topk_idx[:, 0], valid_T)
        domain_T = _safe_idx(domain.to(topk_idx.device), valid_T)
        flat_T = top1_T * self.num_domains + domain_T
        self.expert_domain_ED.view(-1).index_add_(0, flat_T.to(dev), valid_T.to(_STAT_DTYPE).to(dev))
        return self

    @torch.no_grad()
    def finalize(self) -> dict:
        """-> {domain_mi: float (nats); expert_domain: [E, D] float64 counts}."""
        mi, _, _ = _mutual_information(self.expert_domain_ED)
        return {"domain_mi": mi.item(), "expert_domain": self.expert_domain_ED.clone()}


# ----------------------------------------------------------------------------- convenience
def routing_metrics(probs, topk_idx, valid=None) -> dict:
    """One batch of :class:`RoutingStats`: ``probs_TE`` [T, E], ``topk_idx_TK`` [T, k]."""
    return RoutingStats(probs.shape[1], device=probs.device).update(probs, topk_idx, valid).finalize()


def activation_similarity(z, valid=None, eps: float = 1e-6) -> float:
    """Mean |cos| over co-activated pairs of ``z_TKF`` [T, k, F] (0 for k = 1 or no token)."""
    return SimilarityStats(None, device=z.device, eps=eps).update(z, valid).finalize()[
        "activation_similarity"]


def expert_similarity_matrix(z, topk_idx, num_experts: int, valid=None, eps: float = 1e-6):
    """[E, E] mean |cos| per expert pair over the tokens that co-activated it; 0 where never."""
    stats = SimilarityStats(num_experts, device=z.device, eps=eps)
    return stats.update(z, valid, topk_idx).finalize()["similarity"]


def pathway_metrics(topk_idx, next_topk_idx, num_experts: int, valid=None,
                    next_num_experts: Optional[int] = None) -> dict:
    """One batch of :class:`PathwayStats` -> {pathway_nmi, transition [E, E']}."""
    stats = PathwayStats(num_experts, next_num_experts, device=topk_idx.device)
    return stats.update(topk_idx, next_topk_idx, valid).finalize()


def domain_specialization(topk_idx, domain, num_experts: int, num_domains: int,
                          valid=None) -> float:
    """MI (nats) between the top-1 expert and the domain over the valid tokens."""
    stats = DomainStats(num_experts, num_domains, device=topk_idx.device)
    return stats.update(topk_idx, domain, valid).finalize()["domain_mi"]
