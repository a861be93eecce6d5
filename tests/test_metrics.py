"""Tests of megatron_moe_spec.metrics: brute force (numpy / loops), hand cases, exact reducibility."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from megatron_moe_spec.metrics import (
    DomainStats,
    PathwayStats,
    RoutingStats,
    SimilarityStats,
    activation_similarity,
    domain_specialization,
    expert_similarity_matrix,
    pathway_metrics,
    routing_metrics,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def routing_case(T, E, k, seed, mask=True):
    g = gen(seed)
    # peaked logits so that some experts stay unused
    probs = (3 * torch.randn(T, E, generator=g)).softmax(-1)
    idx = probs.topk(k).indices
    valid = (torch.rand(T, generator=g) > 0.3) if mask else None
    return probs, idx, valid


# ----------------------------------------------------------------------------- brute force
def np_entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def bf_routing(probs, idx, valid):
    probs, idx = probs.double().numpy(), idx.numpy()
    T, E = probs.shape
    rows = [t for t in range(T) if valid is None or bool(valid[t])]
    n = len(rows)
    H = [np_entropy(probs[t]) for t in rows]
    c = np.zeros(E)
    sets = [set(idx[t].tolist()) for t in rows]
    for s in sets:
        for e in s:
            c[e] += 1
    ratios = []
    for e, v in itertools.combinations(range(E), 2):
        both = sum(1 for s in sets if e in s and v in s)
        either = sum(1 for s in sets if e in s or v in s)
        if either > 0:
            ratios.append(both / either)
    pbar = probs[rows].mean(0) if n else np.zeros(E)
    return {
        "routing_entropy": (sum(H) / n / math.log(E)) if n else 0.0,
        "topk_mass": (sum(probs[t, idx[t]].sum() for t in rows) / n) if n else 0.0,
        "load_cv": float(c.std() / c.mean()) if c.mean() > 0 else 0.0,
        "max_vio": float(c.max() / c.mean() - 1) if c.mean() > 0 else 0.0,
        "dead_experts": int((c == 0).sum()),
        "token_expert_mi": (np_entropy(pbar) - sum(H) / n) if n else 0.0,
        "coactivation": float(np.mean(ratios)) if ratios else 0.0,
        "tokens_per_expert": c,
    }


def bf_mi(x, y):
    n = len(x)
    if n == 0:
        return 0.0, 0.0, 0.0
    px, py, pxy = {}, {}, {}
    for a, b in zip(x, y):
        px[a] = px.get(a, 0) + 1 / n
        py[b] = py.get(b, 0) + 1 / n
        pxy[(a, b)] = pxy.get((a, b), 0) + 1 / n
    mi = sum(p * math.log(p / (px[a] * py[b])) for (a, b), p in pxy.items())
    hx = -sum(p * math.log(p) for p in px.values())
    hy = -sum(p * math.log(p) for p in py.values())
    return mi, hx, hy


def bf_abs_cos(a, b, eps=1e-6):
    return abs(float(a @ b)) / (max(float(a.norm()), eps) * max(float(b.norm()), eps))


# ----------------------------------------------------------------------------- routing
@pytest.mark.parametrize("mask", [False, True])
def test_routing_metrics_match_brute_force(mask):
    probs, idx, valid = routing_case(60, 10, 3, seed=1, mask=mask)
    got = routing_metrics(probs, idx, valid)
    ref = bf_routing(probs, idx, valid)
    for key in ("routing_entropy", "topk_mass", "load_cv", "max_vio", "token_expert_mi", "coactivation"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
    assert got["dead_experts"] == ref["dead_experts"]
    np.testing.assert_array_equal(got["tokens_per_expert"].numpy(), ref["tokens_per_expert"])


def test_routing_metrics_hand_computed():
    # E = 4, k = 2. A_t = {0,1}, {0,1}, {0,2}; token 3 masked (garbage index -1 must be ignored).
    # c = (3, 2, 1, 0): mean 1.5, pop. std sqrt(((1.5)^2 + .5^2 + .5^2 + 1.5^2)/4) = sqrt(1.25)
    #   CV = sqrt(1.25)/1.5 ; MaxVio = 3/1.5 - 1 = 1 ; dead = 1 (expert 3)
    # co-activation, #both / #either per pair; all 6 unions are non-empty (expert 3 is dead, but its
    # partner is not): (0,1): 2/3  (0,2): 1/3  (0,3): 0/3  (1,2): 0/3  (1,3): 0/2  (2,3): 0/1
    #   -> mean = (2/3 + 1/3) / 6 = 1/6
    probs = torch.tensor([[0.4, 0.4, 0.1, 0.1], [0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25],
                          [0.25, 0.25, 0.25, 0.25]])
    idx = torch.tensor([[0, 1], [1, 0], [2, 0], [-1, -1]])
    valid = torch.tensor([True, True, True, False])
    m = routing_metrics(probs, idx, valid)
    assert m["load_cv"] == pytest.approx(math.sqrt(1.25) / 1.5)
    assert m["max_vio"] == pytest.approx(1.0)
    assert m["dead_experts"] == 1
    assert m["coactivation"] == pytest.approx((2 / 3 + 1 / 3) / 6)
    # M_t = .8, 1.0, .5 -> mean 2.3/3
    assert m["topk_mass"] == pytest.approx(2.3 / 3)
    # H: token 1 = log 2 ; token 2 = log 4 ; token 0 = -(2*.4 log .4 + 2*.1 log .1)
    h0 = -(0.8 * math.log(0.4) + 0.2 * math.log(0.1))
    mean_h = (h0 + math.log(2) + math.log(4)) / 3
    assert m["routing_entropy"] == pytest.approx(mean_h / math.log(4))
    pbar = np.array([1.15, 1.15, 0.35, 0.35]) / 3
    assert m["token_expert_mi"] == pytest.approx(np_entropy(pbar) - mean_h)


def test_coactivation_excludes_pairs_never_chosen():
    # E = 4, k = 2, every token picks {0, 1}: pair (0,1) -> 1; (0|1, 2|3) -> 0 (union non-empty);
    # (2,3) never chosen by anyone: excluded. Mean over 5 pairs = 1/5 (it would be 1/6 if included).
    idx = torch.tensor([[0, 1]] * 5)
    probs = torch.full((5, 4), 0.25)
    assert routing_metrics(probs, idx)["coactivation"] == pytest.approx(1 / 5)


def test_routing_metrics_empty_and_no_grad():
    probs = torch.randn(7, 5).softmax(-1).requires_grad_(True)
    idx = probs.detach().topk(2).indices
    m = routing_metrics(probs, idx, torch.zeros(7, dtype=torch.bool))
    assert all(v == 0 for k, v in m.items() if k not in ("dead_experts", "tokens_per_expert"))
    assert m["dead_experts"] == 5
    m = routing_metrics(probs[:0], idx[:0])
    assert all(math.isfinite(v) for k, v in m.items() if k != "tokens_per_expert")
    stats = RoutingStats(5).update(probs, idx)
    assert not any(getattr(stats, f).requires_grad for f in stats._fields)


# ----------------------------------------------------------------------------- similarity
def test_activation_similarity_matches_brute_force():
    g = gen(2)
    T, k, F, E = 25, 3, 6, 7
    z = torch.randn(T, k, F, generator=g)
    z[4, 1] = 0.0  # dead SwiGLU: |cos| = 0 with it
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    valid = torch.rand(T, generator=g) > 0.3
    vals, S, C = [], np.zeros((E, E)), np.zeros((E, E))
    for t in range(T):
        if not valid[t]:
            continue
        for i, j in itertools.combinations(range(k), 2):
            c = bf_abs_cos(z[t, i].double(), z[t, j].double())
            vals.append(c)
            e, v = int(idx[t, i]), int(idx[t, j])
            S[e, v] += c
            S[v, e] += c
            C[e, v] += 1
            C[v, e] += 1
    assert activation_similarity(z, valid) == pytest.approx(np.mean(vals), rel=1e-5)
    mat = expert_similarity_matrix(z, idx, E, valid).numpy()
    ref = np.where(C > 0, S / np.maximum(C, 1), 0.0)
    np.testing.assert_allclose(mat, ref, rtol=1e-5, atol=1e-7)
    assert (mat[C == 0] == 0).all() and np.isfinite(mat).all()
    # bf16 input, fp32 accumulation: the brute force (float64) on the values the bf16 tensor holds
    z16 = z.bfloat16()
    vals16 = [bf_abs_cos(z16[t, i].double(), z16[t, j].double())
              for t in range(T) if valid[t] for i, j in itertools.combinations(range(k), 2)]
    assert activation_similarity(z16, valid) == pytest.approx(np.mean(vals16), rel=1e-5)


def test_activation_similarity_hand_and_k1():
    # k = 3: e1, e2, e1+e2 -> |cos| = 0, 1/sqrt2, 1/sqrt2 -> mean sqrt2/3
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    assert activation_similarity(z) == pytest.approx(math.sqrt(2) / 3, rel=1e-6)
    assert activation_similarity(torch.randn(4, 1, 3)) == 0.0
    # eps convention: |cos(1e-7 e1, e1)| = 1e-7 / (max(1e-7, 1e-6) * 1) = 0.1
    assert activation_similarity(torch.tensor([[[1e-7, 0.0], [1.0, 0.0]]])) == pytest.approx(0.1, rel=1e-5)


# ----------------------------------------------------------------------------- pathway / domain
def test_pathway_hand_cases():
    a = torch.tensor([[0, 2], [0, 3], [1, 2], [1, 0]])
    # top-1 at l: 0,0,1,1 ; at l': 1,1,0,0 -> a bijection: NMI 1
    b = torch.tensor([[1, 0], [1, 2], [0, 3], [0, 1]])
    out = pathway_metrics(a, b, 4)
    assert out["pathway_nmi"] == pytest.approx(1.0)
    assert out["transition"].tolist()[0][1] == 2 and out["transition"].tolist()[1][0] == 2
    # l': 0,1,0,1 -> independent of l: MI 0, NMI 0
    c = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    assert pathway_metrics(a, c, 4)["pathway_nmi"] == pytest.approx(0.0, abs=1e-12)
    # everything to one expert at both layers: H = 0 at both, defined as 1; no tokens: 0
    z = torch.zeros(4, 2, dtype=torch.long)
    assert pathway_metrics(z, z, 4)["pathway_nmi"] == 1.0
    assert pathway_metrics(z[:0], z[:0], 4)["pathway_nmi"] == 0.0


def test_pathway_matches_brute_force_nmi():
    g = gen(3)
    T, E, E2 = 200, 6, 5
    a = torch.randint(0, E, (T, 2), generator=g)
    b = (a[:, :1] % E2 + torch.randint(0, 2, (T, 2), generator=g)) % E2  # correlated
    valid = torch.rand(T, generator=g) > 0.2
    rows = valid.nonzero().flatten().tolist()
    mi, hx, hy = bf_mi([int(a[t, 0]) for t in rows], [int(b[t, 0]) for t in rows])
    out = pathway_metrics(a, b, E, valid, next_num_experts=E2)
    assert out["pathway_nmi"] == pytest.approx(mi / ((hx + hy) / 2), rel=1e-9)
    assert out["transition"].shape == (E, E2) and out["transition"].sum() == len(rows)


def test_domain_specialization():
    # perfectly aligned: expert 0 <-> domain 1, expert 1 <-> domain 0, uniform -> MI = log 2
    idx = torch.tensor([[0, 1], [0, 2], [1, 0], [1, 2]])
    dom = torch.tensor([1, 1, 0, 0])
    assert domain_specialization(idx, dom, 3, 2) == pytest.approx(math.log(2))
    assert domain_specialization(idx, torch.tensor([0, 1, 0, 1]), 3, 2) == pytest.approx(0.0, abs=1e-12)
    g = gen(4)
    idx = torch.randint(0, 8, (150, 2), generator=g)
    dom = (idx[:, 0] // 3 + torch.randint(0, 2, (150,), generator=g)) % 4
    valid = torch.rand(150, generator=g) > 0.25
    rows = valid.nonzero().flatten().tolist()
    ref, _, _ = bf_mi([int(idx[t, 0]) for t in rows], [int(dom[t]) for t in rows])
    assert domain_specialization(idx, dom, 8, 4, valid) == pytest.approx(ref, rel=1e-9)


# ----------------------------------------------------------------------------- reducibility
def _stats_cases():
    g = gen(5)
    T, E, k, F, D = 64, 8, 2, 5, 3
    probs = (2 * torch.randn(T, E, generator=g)).softmax(-1)
    idx = probs.topk(k).indices
    nidx = torch.randint(0, 6, (T, k), generator=g)
    z = torch.randn(T, k, F, generator=g)
    dom = torch.randint(0, D, (T,), generator=g)
    valid = torch.rand(T, generator=g) > 0.2
    return [
        (lambda: RoutingStats(E), lambda s, sl: s.update(probs[sl], idx[sl], valid[sl])),
        (lambda: SimilarityStats(E), lambda s, sl: s.update(z[sl], valid[sl], idx[sl])),
        (lambda: PathwayStats(E, 6), lambda s, sl: s.update(idx[sl], nidx[sl], valid[sl])),
        (lambda: DomainStats(E, D), lambda s, sl: s.update(idx[sl], dom[sl], valid[sl])),
    ]


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)
        else:
            assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("case", range(4))
def test_micro_batches_and_ranks_reduce_exactly(case):
    make, update = _stats_cases()[case]
    whole = make()
    update(whole, slice(0, 64))
    # two micro-batches accumulated in one object
    acc = make()
    update(acc, slice(0, 23))
    update(acc, slice(23, 64))
    # two "ranks": each its own half, then an all_reduce(SUM) of the flat tensors
    r0, r1 = make(), make()
    update(r0, slice(0, 40))
    update(r1, slice(40, 64))
    summed = r0.as_tensor() + r1.as_tensor()
    reduced = make().load_tensor_(summed)
    # the reduce_ hook with an in-place fn, as dist.all_reduce would be called
    hooked = make()
    update(hooked, slice(0, 40))
    hooked.reduce_(lambda flat: flat.add_(r1.as_tensor()))
    merged = make()
    update(merged, slice(0, 40))
    merged.merge_(r1)
    counts_whole = whole.as_tensor()
    for other in (acc, reduced, hooked, merged):
        torch.testing.assert_close(other.as_tensor(), counts_whole, rtol=1e-12, atol=1e-12)
        _assert_same(other.finalize(), whole.finalize())
    assert whole.as_tensor().dtype == torch.float64


def test_counts_are_exact_integers_after_reduction():
    probs, idx, valid = routing_case(100, 6, 2, seed=6)
    a, b = RoutingStats(6).update(probs[:50], idx[:50], valid[:50]), RoutingStats(6).update(probs[50:], idx[50:], valid[50:])
    whole = RoutingStats(6).update(probs, idx, valid)
    a.merge_(b)
    assert torch.equal(a.tokens_per_expert_E, whole.tokens_per_expert_E)
    assert torch.equal(a.pair_counts_EE, whole.pair_counts_EE)
    assert a.num_tokens.item() == int(valid.sum())


def test_load_tensor_rejects_wrong_size_and_merge_wrong_kind():
    with pytest.raises(ValueError):
        RoutingStats(4).load_tensor_(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError):
        RoutingStats(4).merge_(DomainStats(4, 2))
