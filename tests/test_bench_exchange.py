"""scripts/bench_exchange.py: its ratios from hand-made byte counts (no processes), and its variants."""
import pytest
from conftest import load_script


def rank(bytes_by_variant, times=None):
    return {"bytes": bytes_by_variant, "step_times_s": times or {n: [] for n in bytes_by_variant},
            "tokens_per_microbatch": 2048}


def counts(a2a, mask=0, gather=10):
    return {"all_to_all": a2a, "all_gather": gather, "reduce_scatter": 0, "all_reduce": 999, "mask_uint8": mask}


def test_ratios_sum_the_ranks_and_set_the_mask_apart():
    bench = load_script("bench_exchange")
    shape = {"moe_ffn_hidden_size": 3584, "hidden_size": 1024}
    variants = ["off", "sp", "sp_b16"]
    # Rank 0 sends more exchange rows than rank 1 (routing), the sums are what count.
    ranks = [rank({"off": counts(1000), "sp": counts(2500), "sp_b16": counts(1100, mask=4)}),
             rank({"off": counts(1000), "sp": counts(1300), "sp_b16": counts(1020, mask=4)})]
    out = bench.summarize(ranks, variants, shape)
    dispatch = 2 * (1000 + 10)  # all-to-all + all-gather of both ranks; all-reduce is not token traffic
    assert out["dispatch_bytes_per_step"] == dispatch
    assert out["values_ratio_F_over_2H"] == 1.75
    sp, b16 = out["variants"]["sp"], out["variants"]["sp_b16"]
    assert sp["exchange_bytes"] == 1800 and sp["exchange_over_dispatch"] == pytest.approx(1800 / dispatch)
    assert b16["exchange_bytes"] == 120 and b16["mask_bytes"] == 8
    assert b16["rows_over_exact"] == pytest.approx(112 / 1800)
    assert b16["exchange_over_exact"] == pytest.approx(120 / 1800)
    assert "step_time_ratio" not in sp  # bytes only: no timed steps


def test_budget_variants_become_sp_max_tokens():
    bench = load_script("bench_exchange")
    assert bench.spec_config("sp_b16", 2048).sp_max_tokens == 128
    assert bench.spec_config("sp_b4", 2048).sp_max_tokens == 512
    assert bench.spec_config("sp", 2048).sp_max_tokens is None
    assert bench.spec_config("off", 2048).any_loss is False
    overhead = load_script("bench_overhead")
    assert overhead.variant_config("lb_sp_cp_b16", 2048).sp_max_tokens == 128
    assert overhead.variant_config("lb_sp_cp_b16", 2048).cp_coeff > 0
