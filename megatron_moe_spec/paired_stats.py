"""Paired comparisons over seeds: mean, a t confidence interval, seeds won, and whether a difference is shown.

Pure Python (no numpy, no scipy: scipy is not a dependency). Student's t distribution through the
regularized incomplete beta function (continued fraction, modified Lentz), its quantile by bisection.

    summary = paired_summary([-0.3, -2.0, -0.2])   # per seed: variant minus baseline
    summary["ci_low"], summary["ci_high"], summary["shown"]

A difference is *shown* when its two-sided 95% interval, mean ± t_{0.975, n-1} * s / sqrt(n), excludes 0
(equivalently a paired t-test rejects "no difference" at the 5% level). With one seed there is no
interval and nothing is shown.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

CONFIDENCE = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (Numerical Recipes' betacf, Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                 + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf needs df > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (0 < p < 1), by bisection."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
        if hi > 1e12:
            raise ArithmeticError(f"t_quantile({p}, {df}) out of range")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_summary(diffs: Sequence[Optional[float]], confidence: float = CONFIDENCE) -> Dict[str, object]:
    """Summary of per-seed paired differences (None entries are left out).

    Returns ``{"n", "mean", "std" (sample, ddof 1), "ci_low", "ci_high", "below" (seeds with a negative
    difference), "above", "shown"}``; ``shown`` is True when n >= 2 and the ``confidence`` t interval
    excludes 0. Mean None for no seed; std and the interval None for one seed, and for n >= 2 with
    every difference equal the interval is that value (zero width)."""
    xs = [float(d) for d in diffs if d is not None]
    n = len(xs)
    out: Dict[str, object] = {"n": n, "mean": None, "std": None, "ci_low": None, "ci_high": None,
                              "below": sum(x < 0 for x in xs), "above": sum(x > 0 for x in xs), "shown": False}
    if n == 0:
        return out
    mean = sum(xs) / n
    out["mean"] = mean
    if n < 2:
        return out
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    out.update(std=std, ci_low=mean - half, ci_high=mean + half)
    out["shown"] = bool(mean - half > 0 or mean + half < 0)
    return out
