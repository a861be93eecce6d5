"""What one MoE layer's router decided for one micro-batch, in the shapes the losses take."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RoutingRecord:
    """Routing of the T local tokens of one micro-batch by one MoE layer.

    probs_TE:  the pre-top-k distribution p_t (softmax of the logits, or sigmoid scores divided by
               their sum), with autograd history back to the router weights (fp32).
    gates_TE:  the gates megatron multiplies expert outputs with (0 off the top-k), with history.
    routing_map_TE: bool, the experts each token is dispatched to (after group-limited top-k, expert
               bias and capacity dropping).
    valid_T:   bool, tokens that count: not padding and not (partly) dropped by capacity.
    topk_idx_TK: the k selected experts of each token, in ascending expert order: the slot order
               of the token exchange (rows of dropped tokens are arbitrary and masked by valid_T).
    top1_T:    the expert with the largest gate (the "top-1" of the pathway and domain metrics).
    not_padding_T: bool, tokens that are not padding (capacity-dropped tokens included): the tokens
               the LM loss counts, for the per-token-loss scale.
    """

    probs_TE: torch.Tensor
    gates_TE: torch.Tensor
    routing_map_TE: torch.Tensor
    valid_T: torch.Tensor
    topk_idx_TK: torch.Tensor
    top1_T: torch.Tensor
    not_padding_T: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.probs_TE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[1]

    @property
    def topk(self) -> int:
        return self.topk_idx_TK.shape[1]


def topk_indices_from_map(routing_map_TE: torch.Tensor, topk: int) -> torch.Tensor:
    """[T, k] expert indices of each token's True entries, ascending; rows with fewer than k
    entries (dropped tokens) are padded with their last valid index or 0."""
    num_experts = routing_map_TE.shape[1]
    # Sort key: selected experts first (by index), unselected after.
    key = torch.where(routing_map_TE, 0, num_experts) + torch.arange(num_experts, device=routing_map_TE.device)
    order = torch.argsort(key, dim=1, stable=True)
    return order[:, :topk]


def pre_topk_distribution(logits_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """The spec's p_t: softmax of the logits, or sigmoid / sqrtsoftplus scores over their sum (fp32)."""
    logits = logits_TE.float()
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits)
    elif score_function == "sqrtsoftplus":
        scores = torch.sqrt(torch.nn.functional.softplus(logits))
    else:
        raise ValueError(f"unsupported moe_router_score_function {score_function!r}")
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def valid_tokens(routing_map_TE: torch.Tensor, topk: int,
                 padding_mask_T: Optional[torch.Tensor]) -> torch.Tensor:
    """Tokens that count: not padding (megatron's mask: True = padding) and all k experts kept."""
    valid = routing_map_TE.sum(dim=1) == topk
    if padding_mask_T is not None:
        valid = valid & ~padding_mask_T.reshape(-1).bool()
    return valid
