"""The four expert-specialization losses, in pure PyTorch (no Megatron import).

The mathematical contract is docs/spec.md (= /work/shared/spec/losses.md); section numbers below
refer to it. docs/losses.md explains the implementation choices and has the benchmark numbers.

Conventions shared by every loss:

- ``valid_T`` (bool [T], optional) selects the valid tokens (the spec's set T); masked tokens
  contribute nothing to the value or to any gradient (``torch.where``, never a multiply, so a
  NaN in a padding row cannot leak).
- Reductions over tokens are means over the valid tokens, written as an explicit
  ``sum / max(count, 1)``: an all-masked batch and T = 0 give exactly 0 with a zero gradient.
- Everything is computed in fp32 (fp64 when the input is fp64, for ``gradcheck``); bf16/fp16
  inputs are never rounded before the fp32 accumulation. The result is an fp32 scalar (fp64 for
  fp64 inputs).
- R_sp and L_o never materialize more than O(T k^2) beyond their input: both need only the
  per-token Gram matrix ``G_TKK = z z^T``, computed by :class:`_TokenGram`, whose backward
  recomputes nothing and keeps only the input itself (dL/dz = (dL/dG + dL/dG^T) z).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "specialization_loss",
    "coupling_loss",
    "coupling_loss_from_mass",
    "topk_mass",
    "orthogonality_loss",
    "variance_loss",
    "strided_token_subset",
    "global_strided_mask",
    "token_gram",
]

SIMILARITIES = ("squared_cosine", "abs_cosine")
CP_FORMS = ("product", "log")
V_FORMS = ("paper", "per_token")
CP_LOG_EPS = 1e-9
"""The constant inside the log of ``cp_form: log`` (spec section 2)."""

# Largest number of elements of an fp32 working copy of z (chunk of tokens) when the input is
# bf16/fp16 or a token subset is gathered: 2^24 elements = 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- helpers
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (gradcheck); everything else (fp32, bf16, fp16) is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _valid_or_all(valid_T: Optional[torch.Tensor], num_tokens: int, device) -> torch.Tensor:
    if valid_T is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    if valid_T.shape != (num_tokens,):
        raise ValueError(f"valid must have shape [T]=[{num_tokens}], got {tuple(valid_T.shape)}")
    return valid_T.to(device=device, dtype=torch.bool)


def _masked_token_mean(value_T: torch.Tensor, valid_T: torch.Tensor) -> torch.Tensor:
    """sum_{t valid} value_t / max(#valid, 1). 0 (with zero gradient) when nothing is valid."""
    total = torch.where(valid_T, value_T, torch.zeros_like(value_T)).sum()
    count = valid_T.sum().clamp(min=1).to(value_T.dtype)
    return total / count


def strided_token_subset(valid_T: Optional[torch.Tensor], max_tokens: Optional[int],
                         num_tokens: Optional[int] = None) -> Optional[torch.Tensor]:
    """The spec's ``sp_max_tokens`` (section 1): an evenly strided subset of the valid tokens.

    Args:
        valid_T: bool [T] (None = all ``num_tokens`` tokens valid).
        max_tokens: the cap; None means no cap and returns None (= use every token).
        num_tokens: T, needed only when ``valid_T`` is None.
    Returns:
        int64 [min(n, max_tokens)] token indices, increasing: with n valid tokens at positions
        v_0 < ... < v_{n-1}, the indices v_{floor(i n / m)} for i = 0..m-1, m = min(n, max_tokens).
        Deterministic (no randomness); all valid tokens when n <= max_tokens.
        (Costs one host sync, for ``nonzero``; only used when the cap is set.)
    """
    if max_tokens is None:
        return None
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    if valid_T is None:
        if num_tokens is None:
            raise ValueError("strided_token_subset needs valid_T or num_tokens")
        valid_idx = torch.arange(num_tokens)
    else:
        valid_idx = torch.nonzero(valid_T.to(torch.bool), as_tuple=False).flatten()
    n = valid_idx.numel()
    if n <= max_tokens:
        return valid_idx
    pos = torch.div(torch.arange(max_tokens, device=valid_idx.device) * n, max_tokens,
                    rounding_mode="floor")
    return valid_idx[pos]


def global_strided_mask(seq_len: int, batch_size: int, seq_start: int, seq_count: int,
                        max_tokens: int, device=None, offset: int = 0) -> torch.Tensor:
    """The ``sp_max_tokens`` subset of a micro-batch, chosen by global position (spec section 1).

    The micro-batch has ``batch_size`` sequences of ``seq_len`` tokens, N = seq_len * batch_size
    positions q = b * seq_len + s (batch-major). The subset is every position with
    q % c == offset % c, c = ceil(N / max_tokens): at most ``max_tokens`` positions, spread evenly
    over every sequence. ``offset`` (the MoE layer passes the training step) rotates the subset: the
    c offsets 0..c-1 partition the N positions, so over c consecutive steps every position is
    chosen exactly once. It depends on nothing but (b, s), so a rank holding only positions
    [seq_start, seq_start + seq_count) of every sequence (a sequence-parallel shard) selects
    exactly its share of the same subset.

    Returns bool [seq_count * batch_size] in the MoE layer's token order (sequence-major: local
    token i is (s = seq_start + i // batch_size, b = i % batch_size)). Invalid tokens are removed
    by the caller (``valid & mask``), so at most ``max_tokens`` valid tokens remain.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    total = seq_len * batch_size
    stride = -(-total // max_tokens)
    s_S1 = torch.arange(seq_start, seq_start + seq_count, device=device).unsqueeze(1)
    b_1B = torch.arange(batch_size, device=device).unsqueeze(0)
    return ((b_1B * seq_len + s_S1) % stride == offset % stride).reshape(-1)


# ----------------------------------------------------------------------------- Gram product
def _gram_rows(z_TKF: torch.Tensor, rows, dtype: torch.dtype) -> torch.Tensor:
    """G = z z^T for z[rows] ([n, k, k], ``dtype``), in chunks of tokens whenever a cast or a
    gather needs a working copy (at most ``_CHUNK_ELEMENTS`` elements at a time)."""
    if rows is None and z_TKF.dtype == dtype:
        return torch.bmm(z_TKF, z_TKF.transpose(1, 2))  # no copy at all
    T, K, F = z_TKF.shape
    n = T if rows is None else rows.numel()
    out = torch.empty(n, K, K, dtype=dtype, device=z_TKF.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, K * F))
    for start in range(0, n, step):  # a loop over chunks of tokens, not over tokens
        sel = slice(start, min(n, start + step))
        zc = (z_TKF[sel] if rows is None else z_TKF.index_select(0, rows[sel])).to(dtype)
        out[sel] = torch.bmm(zc, zc.transpose(1, 2))
    return out


class _TokenGram(torch.autograd.Function):
    """G_TKK[t] = z[t] z[t]^T in fp32 (fp64 for fp64 input), optionally on a token subset.

    Saves only the input ``z`` (no fp32 copy, no gathered copy); backward is
    dL/dz[t] = (dL/dG[t] + dL/dG[t]^T) z[t], accumulated in fp32 and chunked over tokens like
    the forward when z is bf16/fp16 or a subset is used; rows outside the subset get 0.
    First-order only (``once_differentiable``): no double backward through R_sp / L_o.
    """

    @staticmethod
    def forward(ctx, z_TKF: torch.Tensor, rows: Optional[torch.Tensor]):
        dtype = _compute_dtype(z_TKF)
        ctx.save_for_backward(z_TKF)
        ctx.rows = rows
        return _gram_rows(z_TKF, rows, dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_G):
        (z_TKF,) = ctx.saved_tensors
        rows = ctx.rows
        sym_G = grad_G + grad_G.transpose(1, 2)  # [n, k, k], small
        dtype = sym_G.dtype
        if rows is None and z_TKF.dtype == dtype:
            return torch.bmm(sym_G, z_TKF), None
        T, K, F = z_TKF.shape
        n = T if rows is None else rows.numel()
        grad_z = torch.zeros_like(z_TKF) if rows is not None else torch.empty_like(z_TKF)
        step = max(1, _CHUNK_ELEMENTS // max(1, K * F))
        for start in range(0, n, step):
            sel = slice(start, min(n, start + step))
            if rows is None:
                zc = z_TKF[sel].to(dtype)
                grad_z[sel] = torch.bmm(sym_G[sel], zc).to(z_TKF.dtype)
            else:
                zc = z_TKF.index_select(0, rows[sel]).to(dtype)
                grad_z.index_copy_(0, rows[sel], torch.bmm(sym_G[sel], zc).to(z_TKF.dtype))
        return grad_z, None


def token_gram(z_TKF: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token Gram matrices [T, k, k] (or [len(rows), k, k]) in fp32, memory-lean autograd."""
    if z_TKF.dim() != 3:
        raise ValueError(f"expected [T, k, F], got shape {tuple(z_TKF.shape)}")
    return _TokenGram.apply(z_TKF, rows)


def _gram_and_valid(x_TKF, valid_T, max_tokens):
    """The Gram matrices of the tokens the loss is evaluated on, and their validity mask."""
    T = x_TKF.shape[0]
    if max_tokens is None:
        valid_T = _valid_or_all(valid_T, T, x_TKF.device)
        G = token_gram(x_TKF)
        # Zero the masked tokens' Gram matrices first: no value of a padding row (even inf/NaN)
        # reaches the loss or the gradient of G.
        return torch.where(valid_T[:, None, None], G, torch.zeros_like(G)), valid_T
    rows = strided_token_subset(valid_T, max_tokens, num_tokens=T)
    rows = rows.to(x_TKF.device)
    G = token_gram(x_TKF, rows)
    return G, torch.ones(rows.numel(), dtype=torch.bool, device=x_TKF.device)


# ----------------------------------------------------------------------------- R_sp (section 1)
def specialization_loss(z, valid=None, similarity: str = "squared_cosine", eps: float = 1e-6,
                        *, max_tokens: Optional[int] = None) -> torch.Tensor:
    """R_sp, spec section 1: mean_t (1/P) sum_{e<v in A_t} cos(z_t,e, z_t,v)^2, P = k(k-1)/2.

    Args:
        z: ``z_TKF`` [T, k, F], the SwiGLU intermediates of each token's k routed experts (slot
           order = top-k order; the loss is symmetric in the slots). Any float dtype.
        valid: ``valid_T`` bool [T] or None (all valid).
        similarity: ``squared_cosine`` (cos^2, default) or ``abs_cosine`` (|cos|).
        eps: cos(a, b) = <a,b> / (max(|a|,eps) max(|b|,eps)). max(|a|, eps) is computed as
           sqrt(max(G_aa, eps^2)) (identical value), whose gradient is 0 below the clamp: a zero
           row (a dead SwiGLU) gives cos = 0 and a finite gradient.
        max_tokens: ``sp_max_tokens``: evaluate on :func:`strided_token_subset` only.
    Returns:
        fp32 scalar (fp64 for fp64 input). 0 for k = 1, T = 0 or no valid token.
    Memory: the input plus O(T k^2) (see :class:`_TokenGram`).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    K = z.shape[1]
    G_TKK, valid_T = _gram_and_valid(z, valid, max_tokens)
    norm_TK = torch.diagonal(G_TKK, dim1=1, dim2=2).clamp(min=eps * eps).sqrt()
    cos_TKK = G_TKK / (norm_TK.unsqueeze(2) * norm_TK.unsqueeze(1))
    sim_TKK = cos_TKK.square() if similarity == "squared_cosine" else cos_TKK.abs()
    upper_KK = torch.ones(K, K, dtype=torch.bool, device=z.device).triu(1)
    num_pairs = max(K * (K - 1) // 2, 1)
    per_token_T = torch.where(upper_KK, sim_TKK, torch.zeros_like(sim_TKK)).sum((1, 2)) / num_pairs
    return _masked_token_mean(per_token_T, valid_T)


# ----------------------------------------------------------------------------- R_cp (section 2)
def topk_mass(probs, topk_idx) -> torch.Tensor:
    """M_t = sum_{e in A_t} p_t,e, spec section 2.

    Args: ``probs_TE`` [T, E], the *pre*-top-k distribution; ``topk_idx_TK`` [T, k] int.
    Returns: ``mass_T`` [T] in fp32 (fp64 for fp64 probs); differentiable w.r.t. probs (gather).
    """
    return probs.gather(1, topk_idx.long()).to(_compute_dtype(probs)).sum(1)


def coupling_loss_from_mass(mass, next_mass, valid=None, form: str = "product") -> torch.Tensor:
    """R_cp from precomputed top-k masses (a pipeline stage receives M^l from the previous one).

    ``mass_T``, ``next_mass_T``: [T] (:func:`topk_mass` of layers l and l'); ``valid_T`` bool [T]
    (the tokens valid at both layers). ``form``: ``product`` -> -mean_t M_t M'_t;
    ``log`` -> -mean_t log(M_t M'_t + 1e-9). Returns an fp32 scalar (fp64 for fp64 input).
    """
    if form not in CP_FORMS:
        raise ValueError(f"form must be one of {CP_FORMS}, got {form!r}")
    if mass.shape != next_mass.shape or mass.dim() != 1:
        raise ValueError(f"mass and next_mass must both be [T], got {tuple(mass.shape)}, "
                         f"{tuple(next_mass.shape)}")
    dtype = torch.promote_types(_compute_dtype(mass), _compute_dtype(next_mass))
    joint_T = mass.to(dtype) * next_mass.to(dtype)
    valid_T = _valid_or_all(valid, mass.shape[0], mass.device)
    if form == "log":
        # Masked tokens are replaced by 1 *before* the log: no -inf/NaN can reach the gradient.
        joint_T = torch.log(torch.where(valid_T, joint_T, torch.ones_like(joint_T)) + CP_LOG_EPS)
    return -_masked_token_mean(joint_T, valid_T)


def coupling_loss(probs, topk_idx, next_probs, next_topk_idx, valid=None,
                  form: str = "product") -> torch.Tensor:
    """R_cp, spec section 2: -mean_t M_t^l M_t^l' (or -mean_t log(M M' + 1e-9)).

    Args:
        probs: ``probs_TE`` [T, E], layer l's pre-top-k distribution (softmax of the logits, or
            scores / sum). NOT the renormalized top-k gates: those make M == 1 and the loss
            constant, with no gradient.
        topk_idx: ``topk_idx_TK`` [T, k]; next_probs [T, E'], next_topk_idx [T, k'] of layer l'.
        valid: ``valid_T`` bool [T]. form: ``product`` (default) or ``log``.
    Gradient flows into both probs tensors (through the gather in :func:`topk_mass`).
    """
    return coupling_loss_from_mass(topk_mass(probs, topk_idx),
                                   topk_mass(next_probs, next_topk_idx), valid, form)


# ----------------------------------------------------------------------------- L_o (section 3)
def orthogonality_loss(y, valid=None, eps: float = 1e-6, *,
                       max_tokens: Optional[int] = None) -> torch.Tensor:
    """L_o, spec section 3 (arXiv 2505.22323 Eq. 6, grouped by token):

        mean_t (1/k) sum_{j != m} || (<y_j,y_m> / (<y_m,y_m> + eps)) y_m ||^2
      = mean_t (1/k) sum_{j != m} G_jm^2 G_mm / (G_mm + eps)^2,      G = y_t y_t^T.

    Args: ``y_TKH`` [T, k, H] unweighted expert outputs (any float dtype); ``valid_T`` bool [T];
    ``max_tokens`` as in :func:`specialization_loss`. Returns an fp32 scalar; 0 for k = 1.
    A zero row gives 0 / eps^2 = 0 with a finite gradient. Memory: input plus O(T k^2).
    """
    K = y.shape[1]
    G_TKK, valid_T = _gram_and_valid(y, valid, max_tokens)
    sq_norm_TK = torch.diagonal(G_TKK, dim1=1, dim2=2)
    # proj_TKK[t, j, m] = G_jm^2 G_mm / (G_mm + eps)^2 ; column m is the expert projected onto.
    proj_TKK = G_TKK.square() * (sq_norm_TK / (sq_norm_TK + eps).square()).unsqueeze(1)
    off_diag_KK = ~torch.eye(K, dtype=torch.bool, device=y.device)
    per_token_T = torch.where(off_diag_KK, proj_TKK, torch.zeros_like(proj_TKK)).sum((1, 2)) / K
    return _masked_token_mean(per_token_T, valid_T)


# ----------------------------------------------------------------------------- L_v (section 4)
def variance_loss(gates, valid=None, form: str = "paper", probs=None) -> torch.Tensor:
    """L_v, spec section 4 (arXiv 2505.22323 Eq. 7).

    ``form="paper"``: -(1/E) sum_e Var_{t valid}(g_t,e), population variance over the valid
    tokens, from ``gates_TE`` [T, E] (post-top-k gates, 0 off the top-k).
    ``form="per_token"``: -mean_{t valid} Var_e(p_t,e), population variance across the E experts
    of ``probs_TE`` [T, E] (required; ``gates`` is then unused), as the authors' code does.
    Returns an fp32 scalar (fp64 for fp64 input); 0 with no valid token.
    """
    if form not in V_FORMS:
        raise ValueError(f"form must be one of {V_FORMS}, got {form!r}")
    if form == "per_token":
        if probs is None:
            raise ValueError("variance_loss(form='per_token') needs probs [T, E]")
        p_TE = probs.to(_compute_dtype(probs))
        var_T = (p_TE - p_TE.mean(1, keepdim=True)).square().mean(1)
        return -_masked_token_mean(var_T, _valid_or_all(valid, p_TE.shape[0], p_TE.device))
    g_TE = gates.to(_compute_dtype(gates))
    valid_T = _valid_or_all(valid, g_TE.shape[0], g_TE.device)
    g_TE = torch.where(valid_T.unsqueeze(1), g_TE, torch.zeros_like(g_TE))
    count = valid_T.sum().clamp(min=1).to(g_TE.dtype)
    mean_E = g_TE.sum(0) / count
    dev_TE = torch.where(valid_T.unsqueeze(1), g_TE - mean_E, torch.zeros_like(g_TE))
    var_E = dev_TE.square().sum(0) / count
    return -var_E.mean() if var_E.numel() else var_E.sum()
