"""megatron_moe_spec.paired_stats against a printed t table and confidence intervals worked by hand."""
import math

import pytest

from megatron_moe_spec.paired_stats import betainc, paired_summary, t_cdf, t_quantile

# Student's t, two-sided 95% (the 0.975 quantile), from a printed table (e.g. NIST/SEMATECH e-Handbook,
# table 1.3.6.7.2), 3 decimals.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 100: 1.984}
# one-sided 95% (the 0.95 quantile) and 99.5%, same table
T95 = {1: 6.314, 2: 2.920, 4: 2.132, 10: 1.812, 30: 1.697}
T995 = {1: 63.657, 2: 9.925, 5: 4.032, 10: 3.169}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=6e-4)
    assert t_quantile(0.025, df) == pytest.approx(-T975[df], abs=6e-4)


def test_other_levels_and_cdf():
    for df, t in T95.items():
        assert t_quantile(0.95, df) == pytest.approx(t, abs=6e-4)
    for df, t in T995.items():
        assert t_quantile(0.995, df) == pytest.approx(t, abs=6e-4)
    # closed forms: df=1 is Cauchy, df=2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert t_quantile(0.5, 7) == 0.0
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-4)  # the normal limit
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - sum_{j<2} C(4,j) .4^j .6^(4-j)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_paired_summary_by_hand():
    # [1, 2, 3, 4, 5]: mean 3, s = sqrt(2.5), sem = sqrt(0.5), t_{.975,4} = 2.776445
    s = paired_summary([1, 2, 3, 4, 5])
    half = 2.7764451 * math.sqrt(0.5)
    assert s["n"] == 5 and s["mean"] == 3.0 and s["std"] == pytest.approx(math.sqrt(2.5))
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(3 - half, abs=1e-6), pytest.approx(3 + half, abs=1e-6))
    assert s["shown"] and s["below"] == 0 and s["above"] == 5
    # the docs' vanilla x10 pairs at 1000 steps: -0.31, +0.26, -2.00 (%): the interval contains 0
    s = paired_summary([-0.31, 0.26, -2.00])
    sd = math.sqrt(sum((x + 0.6833333) ** 2 for x in (-0.31, 0.26, -2.00)) / 2)
    assert s["ci_low"] == pytest.approx(-0.6833333 - 4.3026527 * sd / math.sqrt(3), abs=1e-5)
    assert s["ci_high"] > 0 and not s["shown"] and (s["below"], s["above"]) == (2, 1)
    # all seeds one sign but too few and too spread: not shown; tight: shown
    assert not paired_summary([-0.1, -5.0])["shown"]
    assert paired_summary([-1.0, -1.1, -0.9])["shown"]
    one = paired_summary([-2.0, None])
    assert one["n"] == 1 and one["mean"] == -2.0 and one["ci_low"] is None and not one["shown"]
    assert paired_summary([])["mean"] is None
    same = paired_summary([0.5, 0.5, 0.5])
    assert same["std"] == 0.0 and same["ci_low"] == same["ci_high"] == 0.5 and same["shown"]
