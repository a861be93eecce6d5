"""Tests of megatron_moe_spec.losses against docs/spec.md (sections 1-4).

Brute-force references below loop over tokens and pairs in plain Python and share no code with the
implementation (they use explicit cosines / projection vectors, not Gram matrices).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_moe_spec import losses as L
from megatron_moe_spec.losses import (
    coupling_loss,
    coupling_loss_from_mass,
    orthogonality_loss,
    specialization_loss,
    strided_token_subset,
    topk_mass,
    variance_loss,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 1e-6


# ----------------------------------------------------------------------------- brute force
def bf_cos(a, b, eps=EPS):
    return float(a @ b) / (max(float(a.norm()), eps) * max(float(b.norm()), eps))


def bf_specialization(z, valid=None, similarity="squared_cosine", eps=EPS):
    T, k, _ = z.shape
    z = z.double()
    vals = []
    for t in range(T):
        if valid is not None and not valid[t]:
            continue
        pairs = [(e, v) for e in range(k) for v in range(e + 1, k)]
        s = 0.0
        for e, v in pairs:
            c = bf_cos(z[t, e], z[t, v], eps)
            s += c * c if similarity == "squared_cosine" else abs(c)
        vals.append(s / len(pairs) if pairs else 0.0)
    return sum(vals) / len(vals) if vals else 0.0


def bf_orthogonality(y, valid=None, eps=EPS):
    T, k, _ = y.shape
    y = y.double()
    vals = []
    for t in range(T):
        if valid is not None and not valid[t]:
            continue
        s = 0.0
        for j in range(k):
            for m in range(k):
                if j != m:
                    proj = (float(y[t, j] @ y[t, m]) / (float(y[t, m] @ y[t, m]) + eps)) * y[t, m]
                    s += float((proj * proj).sum())
        vals.append(s / k)
    return sum(vals) / len(vals) if vals else 0.0


def bf_variance(gates, valid=None):
    T, E = gates.shape
    rows = [t for t in range(T) if valid is None or valid[t]]
    if not rows:
        return 0.0
    total = 0.0
    for e in range(E):
        xs = [float(gates[t, e]) for t in rows]
        mu = sum(xs) / len(xs)
        total += sum((x - mu) ** 2 for x in xs) / len(xs)
    return -total / E


def bf_variance_per_token(probs, valid=None):
    T, E = probs.shape
    vals = []
    for t in range(T):
        if valid is not None and not valid[t]:
            continue
        xs = [float(x) for x in probs[t]]
        mu = sum(xs) / E
        vals.append(sum((x - mu) ** 2 for x in xs) / E)
    return -sum(vals) / len(vals) if vals else 0.0


def bf_coupling(probs, idx, nprobs, nidx, valid=None, form="product"):
    vals = []
    for t in range(probs.shape[0]):
        if valid is not None and not valid[t]:
            continue
        m = sum(float(probs[t, e]) for e in idx[t].tolist())
        m2 = sum(float(nprobs[t, e]) for e in nidx[t].tolist())
        vals.append(m * m2 if form == "product" else math.log(m * m2 + 1e-9))
    return -sum(vals) / len(vals) if vals else 0.0


def _torch_cos(a, b, eps=EPS):
    return (a * b).sum(-1) / (a.norm(dim=-1).clamp_min(eps) * b.norm(dim=-1).clamp_min(eps))


def _torch_token_mean(values_T, valid):
    if valid is None:
        return values_T.mean()
    return torch.where(valid, values_T, torch.zeros_like(values_T)).sum() / max(int(valid.sum()), 1)


def torch_specialization(z, valid=None, eps=EPS):
    """bf_specialization (squared cosine) as a differentiable tensor expression, pair by pair."""
    k = z.shape[1]
    pairs = [(e, v) for e in range(k) for v in range(e + 1, k)]
    per_token = sum(_torch_cos(z[:, e], z[:, v], eps).square() for e, v in pairs) / len(pairs)
    return _torch_token_mean(per_token, valid)


def torch_orthogonality(y, valid=None, eps=EPS):
    """bf_orthogonality as a differentiable tensor expression, with the projection vectors."""
    k = y.shape[1]
    per_token = 0
    for j in range(k):
        for m in range(k):
            if j != m:
                coef = (y[:, j] * y[:, m]).sum(-1) / ((y[:, m] * y[:, m]).sum(-1) + eps)
                per_token = per_token + (coef.unsqueeze(-1) * y[:, m]).square().sum(-1)
    return _torch_token_mean(per_token / k, valid)


def rand_routing(T, E, k, gen, dtype=torch.float64):
    logits = torch.randn(T, E, generator=gen, dtype=dtype)
    probs = logits.softmax(-1)
    idx = probs.topk(k, dim=-1).indices
    return logits, probs, idx


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- hand-computed
def test_specialization_hand_computed():
    # token 0, k=3: z = e1, e2, e1+e2. cos(e1,e2)=0, cos(e1,e1+e2)=cos(e2,e1+e2)=1/sqrt2.
    #   squared: (0 + 1/2 + 1/2) / P=3 = 1/3 ;  abs: (0 + 2/sqrt2) / 3 = sqrt2/3
    # token 1, k=3: z = e1, 2 e1, -e1: all cos^2 = 1 -> 1 ; abs -> 1
    # token 2: masked, holds NaN (must not leak).
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                      [[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]],
                      [[float("nan"), 0.0], [0.0, 1.0], [1.0, 1.0]]], requires_grad=True)
    valid = torch.tensor([True, True, False])
    sq = specialization_loss(z, valid)
    assert sq.dtype == torch.float32
    assert sq.item() == pytest.approx((1 / 3 + 1) / 2, abs=1e-6)
    ab = specialization_loss(z, valid, similarity="abs_cosine")
    assert ab.item() == pytest.approx((math.sqrt(2) / 3 + 1) / 2, abs=1e-6)
    sq.backward()
    assert torch.isfinite(z.grad[:2]).all()
    # eps convention max(|a|, eps): a = 1e-7 e1 (below eps), b = e1 -> cos = 1e-7 / (1e-6 * 1) = 0.1
    tiny = torch.tensor([[[1e-7, 0.0], [1.0, 0.0]]])
    assert specialization_loss(tiny).item() == pytest.approx(0.01, rel=1e-5)
    assert specialization_loss(tiny, similarity="abs_cosine").item() == pytest.approx(0.1, rel=1e-5)
    assert specialization_loss(tiny, eps=1e-8).item() == pytest.approx(1.0, rel=1e-5)


def test_orthogonality_hand_computed():
    # y1 = (1,0), y2 = (1,1). proj of y1 on y2: (1/2) y2, |.|^2 = 1/2; proj of y2 on y1: y1, |.|^2 = 1.
    # L_o = (1/2 + 1) / k=2 = 0.75 (eps = 1e-6 changes it by < 1e-5).
    y = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert orthogonality_loss(y).item() == pytest.approx(0.75, abs=1e-5)
    assert orthogonality_loss(y, eps=0.0).item() == pytest.approx(0.75, abs=1e-7)
    # eps in the denominator: y1 = e1, y2 = 1e-3 e1. proj of y1 on y2: (1e-3 / (1e-6 + 1e-6)) y2
    #   = 500 * 1e-3 e1 -> |.|^2 = 0.25 ; proj of y2 on y1: (1e-3 / (1 + 1e-6)) e1 -> ~1e-6.
    #   L_o = (0.25 + 1e-6 / (1 + 1e-6)^2) / 2
    y = torch.tensor([[[1.0, 0.0], [1e-3, 0.0]]])
    assert orthogonality_loss(y).item() == pytest.approx((0.25 + 1e-6 / (1 + 1e-6) ** 2) / 2, rel=1e-5)
    # orthogonal outputs: 0
    assert orthogonality_loss(torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])).item() == 0.0


def test_variance_hand_computed():
    # gates [[1,0],[0,1]] (+ masked row): each expert's gate is {1,0}: mean 1/2, pop. var 1/4.
    # L_v = -(1/4 + 1/4)/2 = -0.25
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    valid = torch.tensor([True, True, False])
    assert variance_loss(gates, valid).item() == pytest.approx(-0.25)
    # per_token: p = (.5,.5) -> var 0 ; p = (1, 0) -> var 1/4 ; mean 1/8 -> -0.125
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.3, 0.7]])
    assert variance_loss(gates, valid, form="per_token", probs=probs).item() == pytest.approx(-0.125)


def test_coupling_hand_computed():
    # layer l: p = (.5,.3,.2), top-2 = {0,1} -> M = 0.8 ; layer l': p = (.6,.4), top-1 = {0} -> M' = .6
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    idx = torch.tensor([[0, 1]])
    nprobs = torch.tensor([[0.6, 0.4]])
    nidx = torch.tensor([[0]])
    assert topk_mass(probs, idx).item() == pytest.approx(0.8)
    assert coupling_loss(probs, idx, nprobs, nidx).item() == pytest.approx(-0.48)
    assert coupling_loss(probs, idx, nprobs, nidx, form="log").item() == pytest.approx(-math.log(0.48 + 1e-9))


def test_strided_token_subset():
    valid = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)  # valid at 0,2,3,4,6,7,9 (n=7)
    # m = 3: positions floor(i*7/3) = 0, 2, 4 -> tokens 0, 3, 6
    assert strided_token_subset(valid, 3).tolist() == [0, 3, 6]
    assert strided_token_subset(valid, 100).tolist() == [0, 2, 3, 4, 6, 7, 9]
    assert strided_token_subset(valid, None) is None
    assert strided_token_subset(None, 4, num_tokens=8).tolist() == [0, 2, 4, 6]
    for n, m in [(1000, 7), (64, 63), (5, 1)]:
        idx = strided_token_subset(torch.ones(n, dtype=torch.bool), m)
        assert idx.numel() == m and len(set(idx.tolist())) == m
    # The contract in plain Python, on random masks and caps: v_{floor(i n / m)}, i < m.
    g = gen(19)
    for _ in range(30):
        T, m = int(torch.randint(1, 50, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        valid = torch.rand(T, generator=g) > 0.4
        positions = [t for t in range(T) if valid[t]]
        n = len(positions)
        want = positions if n <= m else [positions[(i * n) // m] for i in range(m)]
        assert strided_token_subset(valid, m).tolist() == want, (valid.tolist(), m)


def test_max_tokens_equals_loss_on_the_subset():
    g = gen(1)
    z = torch.randn(40, 3, 8, generator=g)
    valid = torch.rand(40, generator=g) > 0.3
    idx = strided_token_subset(valid, 5)
    ref = bf_specialization(z[idx])
    assert specialization_loss(z, valid, max_tokens=5).item() == pytest.approx(ref, rel=1e-5)
    assert orthogonality_loss(z, valid, max_tokens=5).item() == pytest.approx(bf_orthogonality(z[idx]), rel=1e-5)
    # a cap above the number of valid tokens changes nothing
    assert specialization_loss(z, valid, max_tokens=1000).item() == pytest.approx(
        specialization_loss(z, valid).item(), rel=1e-6)


# ----------------------------------------------------------------------------- brute force, random
@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("similarity", ["squared_cosine", "abs_cosine"])
def test_specialization_matches_brute_force(k, similarity):
    g = gen(k)
    z = torch.randn(17, k, 6, generator=g)
    z[3, 0] = 0.0  # a dead SwiGLU
    valid = torch.rand(17, generator=g) > 0.25
    for v in (None, valid):
        got = specialization_loss(z, v, similarity=similarity)
        assert got.item() == pytest.approx(bf_specialization(z, v, similarity), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_orthogonality_matches_brute_force(k):
    g = gen(10 + k)
    y = torch.randn(13, k, 5, generator=g)
    y[2, -1] = 0.0
    valid = torch.rand(13, generator=g) > 0.25
    for v in (None, valid):
        assert orthogonality_loss(y, v).item() == pytest.approx(bf_orthogonality(y, v), rel=1e-5, abs=1e-7)


def test_variance_matches_brute_force():
    g = gen(3)
    _, probs, idx = rand_routing(21, 6, 2, g, torch.float32)
    gates = torch.zeros_like(probs).scatter(1, idx, probs.gather(1, idx))
    valid = torch.rand(21, generator=g) > 0.3
    for v in (None, valid):
        assert variance_loss(gates, v).item() == pytest.approx(bf_variance(gates, v), rel=1e-5)
        assert variance_loss(gates, v, form="per_token", probs=probs).item() == pytest.approx(
            bf_variance_per_token(probs, v), rel=1e-5)


@pytest.mark.parametrize("form", ["product", "log"])
def test_coupling_matches_brute_force(form):
    g = gen(4)
    _, probs, idx = rand_routing(19, 8, 2, g, torch.float32)
    _, nprobs, nidx = rand_routing(19, 5, 3, g, torch.float32)  # E' and k' differ
    valid = torch.rand(19, generator=g) > 0.3
    for v in (None, valid):
        got = coupling_loss(probs, idx, nprobs, nidx, v, form=form)
        assert got.item() == pytest.approx(bf_coupling(probs, idx, nprobs, nidx, v, form), rel=1e-5)
        # the pipeline entry point (masses computed on another stage), against the same brute force
        via_mass = coupling_loss_from_mass(topk_mass(probs, idx), topk_mass(nprobs, nidx), v, form)
        assert via_mass.item() == pytest.approx(bf_coupling(probs, idx, nprobs, nidx, v, form), rel=1e-5)


# ----------------------------------------------------------------------------- gradcheck (fp64)
def test_gradcheck_specialization():
    g = gen(5)
    valid = torch.tensor([True, False, True, True, False, True])
    for similarity in ("squared_cosine", "abs_cosine"):
        z = torch.randn(6, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda z: specialization_loss(z, valid, similarity), (z,))
        # the token-subset path of the Gram Function (index gather + scatter in backward)
        assert torch.autograd.gradcheck(lambda z: specialization_loss(z, valid, similarity, max_tokens=2), (z,))


def test_gradcheck_specialization_zero_row():
    # A zero row sits below the eps clamp. With eps >> the finite-difference step the loss is
    # smooth there (cos is linear in the zero row, loss even in it), so gradcheck is meaningful.
    g = gen(6)
    z = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    z[1, 2] = 0.0
    z.requires_grad_(True)
    for similarity in ("squared_cosine", "abs_cosine"):
        assert torch.autograd.gradcheck(lambda z: specialization_loss(z, None, similarity, eps=1e-2), (z,))


def test_zero_rows_default_eps_finite_and_zero_gradient():
    z = torch.randn(5, 3, 7, generator=gen(7))
    z[0, 1] = 0.0
    z[4] = 0.0  # a token where all experts are dead
    z.requires_grad_(True)
    for fn in (specialization_loss, orthogonality_loss):
        z.grad = None
        out = fn(z)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(z.grad).all()
        assert (z.grad[4] == 0).all()
    z.grad = None
    specialization_loss(z).backward()
    assert (z.grad[0, 1] == 0).all()  # cos with a zero vector is 0 and so is d cos^2


def test_gradcheck_orthogonality():
    g = gen(8)
    y = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    y[2, 1] = 0.0
    y.requires_grad_(True)
    valid = torch.tensor([True, True, True, False, True])
    assert torch.autograd.gradcheck(lambda y: orthogonality_loss(y, valid), (y,))
    assert torch.autograd.gradcheck(lambda y: orthogonality_loss(y, valid, max_tokens=3), (y,))


def test_gradcheck_variance():
    g = gen(9)
    valid = torch.tensor([True, False, True, True, True])
    gates = torch.rand(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: variance_loss(x, valid), (gates,))
    probs = torch.rand(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: variance_loss(None, valid, "per_token", probs=p), (probs,))


@pytest.mark.parametrize("form", ["product", "log"])
def test_gradcheck_coupling(form):
    g = gen(10)
    valid = torch.tensor([True, True, False, True, True])
    _, probs, idx = rand_routing(5, 6, 2, g)
    _, nprobs, nidx = rand_routing(5, 4, 1, g)
    probs.requires_grad_(True)
    nprobs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, q: coupling_loss(p, idx, q, nidx, valid, form), (probs, nprobs))
    m, nm = topk_mass(probs, idx).detach(), topk_mass(nprobs, nidx).detach()
    m.requires_grad_(True)
    nm.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: coupling_loss_from_mass(a, b, valid, form), (m, nm))


# ----------------------------------------------------------------------------- R_cp: the likely mistake
def test_coupling_needs_pre_topk_probs():
    g = gen(11)
    logits = torch.randn(16, 8, generator=g, requires_grad=True)
    nlogits = torch.randn(16, 8, generator=g, requires_grad=True)
    probs, nprobs = logits.softmax(-1), nlogits.softmax(-1)
    idx, nidx = probs.topk(2).indices, nprobs.topk(2).indices
    loss = coupling_loss(probs, idx, nprobs, nidx)
    loss.backward()
    assert logits.grad.abs().max() > 1e-3 and nlogits.grad.abs().max() > 1e-3
    assert loss.item() > -1.0 + 1e-3

    # The mistake: renormalized top-k gates (Megatron's gates with norm_topk_prob) as "probs".
    logits.grad = nlogits.grad = None
    def renorm(p, i):
        top = p.gather(1, i)
        return torch.zeros_like(p).scatter(1, i, top / top.sum(1, keepdim=True))
    wrong = coupling_loss(renorm(logits.softmax(-1), idx), idx, renorm(nlogits.softmax(-1), nidx), nidx)
    wrong.backward()
    assert wrong.item() == pytest.approx(-1.0, abs=1e-6)  # constant
    assert logits.grad.abs().max() < 1e-6 and nlogits.grad.abs().max() < 1e-6  # no signal


def test_coupling_e_equals_k_is_constant():
    # E = k: all experts chosen, M = 1 exactly -> R_cp = -1 (by definition, nothing to learn)
    probs = torch.randn(6, 4, generator=gen(12)).softmax(-1)
    idx = torch.arange(4).repeat(6, 1)
    assert coupling_loss(probs, idx, probs, idx).item() == pytest.approx(-1.0, abs=1e-6)


# ----------------------------------------------------------------------------- invariances
def test_invariances_specialization_and_orthogonality():
    g = gen(13)
    z = torch.randn(9, 4, 6, generator=g)
    valid = torch.rand(9, generator=g) > 0.3
    perm = torch.tensor([2, 0, 3, 1])
    for fn in (specialization_loss, orthogonality_loss):
        assert fn(z[:, perm], valid).item() == pytest.approx(fn(z, valid).item(), rel=1e-5)
    for scale in (0.01, 7.0):
        assert specialization_loss(z * scale, valid).item() == pytest.approx(
            specialization_loss(z, valid).item(), rel=1e-5)
    # L_o is NOT scale invariant: each projection vector scales with y, its squared norm with s^2.
    assert orthogonality_loss(z * 3.0, valid).item() == pytest.approx(9 * orthogonality_loss(z, valid).item(), rel=1e-4)


def test_invariances_expert_permutation():
    g = gen(14)
    _, probs, idx = rand_routing(11, 6, 2, g, torch.float32)
    _, nprobs, nidx = rand_routing(11, 6, 2, g, torch.float32)
    gates = torch.zeros_like(probs).scatter(1, idx, probs.gather(1, idx))
    valid = torch.rand(11, generator=g) > 0.2
    perm = torch.randperm(6, generator=g)      # new expert j = old expert perm[j]
    inv = torch.argsort(perm)                  # old expert e -> new position inv[e]
    p2, i2, g2 = probs[:, perm], inv[idx], gates[:, perm]
    assert torch.equal(p2.gather(1, i2), probs.gather(1, idx))
    assert coupling_loss(p2, i2, nprobs, nidx, valid).item() == pytest.approx(
        coupling_loss(probs, idx, nprobs, nidx, valid).item(), rel=1e-6)
    assert variance_loss(g2, valid).item() == pytest.approx(variance_loss(gates, valid).item(), rel=1e-6)
    assert variance_loss(g2, valid, "per_token", p2).item() == pytest.approx(
        variance_loss(gates, valid, "per_token", probs).item(), rel=1e-6)


# ----------------------------------------------------------------------------- edge cases
def _all_losses(T, k, E, valid_fn, dtype=torch.float32):
    g = gen(15)
    z = torch.randn(T, k, 5, generator=g, dtype=dtype, requires_grad=True)
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    probs = logits.softmax(-1)
    idx = probs.topk(k).indices
    gates = torch.zeros_like(probs).scatter(1, idx, probs.gather(1, idx))
    valid = valid_fn(T)
    outs = {
        "sp": specialization_loss(z, valid),
        "sp_abs": specialization_loss(z, valid, "abs_cosine"),
        "sp_cap": specialization_loss(z, valid, max_tokens=3),
        "o": orthogonality_loss(z, valid),
        "cp": coupling_loss(probs, idx, probs, idx, valid),
        "cp_log": coupling_loss(probs, idx, probs, idx, valid, form="log"),
        "v": variance_loss(gates, valid),
        "v_tok": variance_loss(gates, valid, "per_token", probs),
    }
    return outs, (z, logits)


@pytest.mark.parametrize("case", ["T0", "all_masked"])
def test_empty_returns_zero_with_zero_gradient(case):
    T, valid_fn = (0, lambda T: None) if case == "T0" else (6, lambda T: torch.zeros(T, dtype=torch.bool))
    outs, (z, logits) = _all_losses(T, 2, 4, valid_fn)
    for name, out in outs.items():
        assert out.dtype == torch.float32, name
        assert out.item() == 0.0, name
        z.grad = logits.grad = None
        out.backward(retain_graph=True)
        for leaf in (z, logits):
            if leaf.grad is not None:
                assert torch.isfinite(leaf.grad).all() and (leaf.grad == 0).all(), name


def test_k1_gives_zero():
    outs, (z, _) = _all_losses(5, 1, 4, lambda T: None)
    for name in ("sp", "sp_abs", "sp_cap", "o"):
        assert outs[name].item() == 0.0
        z.grad = None
        outs[name].backward(retain_graph=True)
        assert (z.grad == 0).all()


def test_nan_in_masked_tokens_does_not_leak():
    # Padding rows holding inf/NaN: the value and the gradient of the valid rows are untouched.
    g = gen(16)
    z = torch.randn(4, 3, 5, generator=g)
    z[2] = float("inf")
    z.requires_grad_(True)
    valid = torch.tensor([True, True, False, True])
    keep = valid.nonzero().flatten()
    logits = torch.randn(4, 6, generator=g)
    logits[2] = float("nan")
    logits.requires_grad_(True)
    probs = logits.softmax(-1)
    idx = torch.tensor([[0, 1]] * 4)
    cases = [
        (specialization_loss(z, valid), specialization_loss(z[keep])),
        (orthogonality_loss(z, valid), orthogonality_loss(z[keep])),
        (coupling_loss(probs, idx, probs, idx, valid, form="log"),
         coupling_loss(probs[keep], idx[keep], probs[keep], idx[keep], form="log")),
        (variance_loss(probs, valid), variance_loss(probs[keep])),
        (variance_loss(probs, valid, "per_token", probs), variance_loss(None, None, "per_token", probs[keep])),
    ]
    for out, ref in cases:
        assert torch.isfinite(out) and out.item() == pytest.approx(ref.item(), rel=1e-6)
        z.grad = logits.grad = None
        out.backward(retain_graph=True)
        for leaf in (z, logits):
            if leaf.grad is not None:
                assert torch.isfinite(leaf.grad[keep]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_computed_in_fp32(dtype, monkeypatch):
    # small chunks force the chunked fp32 path of the Gram Function (forward and backward)
    monkeypatch.setattr(L, "_CHUNK_ELEMENTS", 64)
    g = gen(17)
    z = torch.randn(37, 4, 16, generator=g).to(dtype)
    valid = torch.rand(37, generator=g) > 0.2
    z_lp = z.clone().requires_grad_(True)
    # The reference: the spec's formulas in float64 on the very values the low-precision tensor holds.
    z_64 = z.double().requires_grad_(True)
    references = {specialization_loss: torch_specialization, orthogonality_loss: torch_orthogonality}
    for fn, ref_fn in references.items():
        z_lp.grad = z_64.grad = None
        a, ref = fn(z_lp, valid), ref_fn(z_64, valid)
        assert a.dtype == torch.float32
        # fp32 accumulation: round-off of fp32 (a bf16/fp16 accumulation would be off by ~1e-3)
        assert a.item() == pytest.approx(ref.item(), rel=1e-5)
        a.backward()
        ref.backward()
        assert z_lp.grad.dtype == dtype
        # the gradient, once rounded to the input's dtype: within 2 of its units in the last place
        # (absolute: 2 steps of its subnormal range, where fp16 keeps only absolute precision)
        info = torch.finfo(dtype)
        torch.testing.assert_close(z_lp.grad.double(), z_64.grad, rtol=2 * info.eps,
                                   atol=2 * info.tiny * info.eps + 1e-3 * info.eps * float(z_64.grad.abs().max()))
    # and close to the fp32 values the low-precision tensor was rounded from
    z_ref = torch.randn(37, 4, 16, generator=gen(18))
    assert specialization_loss(z_ref.to(dtype)).item() == pytest.approx(bf_specialization(z_ref), abs=1e-2)
    probs = torch.randn(37, 8, generator=g).softmax(-1)
    idx = probs.topk(2).indices
    p = probs.to(dtype)
    out = coupling_loss(p, idx, p, idx, valid)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(bf_coupling(p, idx, p, idx, valid), rel=1e-6)
    assert variance_loss(p, valid).item() == pytest.approx(bf_variance(p, valid), rel=1e-5)
    assert variance_loss(p, valid).dtype == torch.float32


# ----------------------------------------------------------------------------- memory of the graph
@pytest.mark.parametrize("max_tokens", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [specialization_loss, orthogonality_loss])
def test_autograd_graph_saves_only_z_and_small_tensors(fn, dtype, max_tokens):
    T, k, F = 64, 4, 128
    z = torch.randn(T, k, F).to(dtype).requires_grad_(True)
    valid = torch.rand(T) > 0.1
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(z, valid, max_tokens=max_tokens)
    big = [t for t in saved if t.numel() > T * k * k]
    assert len(big) == 1, [tuple(t.shape) for t in big]
    assert big[0].data_ptr() == z.data_ptr() and big[0].dtype == dtype  # the input itself, no copy
    out.backward()
    assert z.grad.shape == z.shape


# ----------------------------------------------------------------------------- hygiene
def test_no_megatron_import():
    code = ("import sys, megatron_moe_spec.losses, megatron_moe_spec.metrics; "
            "bad = [m for m in sys.modules if m == 'megatron' or m.startswith('megatron.') "
            "or m.startswith('transformer_engine')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": REPO})


def test_bad_options_raise():
    z = torch.randn(2, 2, 3)
    with pytest.raises(ValueError):
        specialization_loss(z, similarity="cosine")
    with pytest.raises(ValueError):
        coupling_loss_from_mass(torch.ones(2), torch.ones(2), form="sum")
    with pytest.raises(ValueError):
        variance_loss(torch.ones(2, 2), form="per_token")


def test_benchmark_quick_smoke():
    out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_losses.py"), "--quick"],
                         check=True, cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert "specialization" in out.stdout and "floor" in out.stdout
