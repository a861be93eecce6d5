"""scripts/bench_overhead.py: the --quick run's JSON, and the memory meter it relies on."""
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

import pytest
from conftest import load_script
import torch

from megatron_moe_spec.core import profiling
from megatron_moe_spec.testing.bench import SavedTensorMeter, static_training_bytes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_script():
    return load_script("bench_overhead")


# ----------------------------------------------------------------------------- the meter
def test_saved_tensor_meter_counts_each_storage_once_and_skips_excluded():
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(16, 8)
    with SavedTensorMeter(exclude=[w]) as meter:
        h = x @ w                      # saves x (and w: excluded)
        y = (h[:, :2] * h[:, 2:]).sum()  # two views of h: h's storage once
        assert meter.live_bytes == meter.peak_bytes == x.numel() * 4 + h.numel() * 4
        y.backward()  # the hooks hand the saved data back: backward works, and frees what it used
        assert meter.live_bytes == 0
    assert meter.storages == 2
    assert torch.allclose(w.grad, x.t() @ torch.cat([h[:, 2:], h[:, :2]], 1).detach())
    xg = x.clone().requires_grad_(True)
    with SavedTensorMeter() as meter_all:
        (xg @ w).sum()  # both operands need a gradient: both are saved; the graph is dropped at once
    assert meter_all.peak_bytes == (x.numel() + w.numel()) * 4
    assert meter_all.live_bytes == 0
    with torch.no_grad(), SavedTensorMeter() as meter_none:
        (xg @ w).sum()
    assert meter_none.peak_bytes == 0


def test_saved_tensor_meter_peak_is_the_largest_live_total():
    x = torch.randn(100, requires_grad=True)
    with SavedTensorMeter() as meter:
        a = x.exp().sum()    # exp saves its output: 400 bytes
        del a                # graph dropped: freed
        b = (x * 2).sin()    # sin saves its input (x * 2): 400 bytes
        c = b.exp()          # exp saves its output: 400 more
        assert meter.live_bytes == 800
    assert meter.peak_bytes == 800
    assert meter.total_bytes == 1200
    del b, c


def test_static_training_bytes_counts_params_grads_and_adam_state():
    layer = torch.nn.Linear(10, 6, bias=False)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.0)
    layer(torch.randn(3, 10)).sum().backward()
    opt.step()
    got = static_training_bytes(layer.parameters(), opt)
    assert got == {"params": 240, "grads": 240, "optimizer_state": 480 + 4}  # exp_avg, exp_avg_sq, step


# ----------------------------------------------------------------------------- the quick run
@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "overhead.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_overhead.py"), "--quick", "--profile", "--json", str(path)],
                   check=True, env=env, cwd=ROOT, timeout=300)
    elapsed = time.monotonic() - start
    return json.loads(path.read_text()), elapsed


@pytest.mark.timeout(330)
def test_quick_run_structure_and_ratios(quick_results):
    results, elapsed = quick_results
    bench = _load_script()
    # --quick is a smoke run: the subprocess timeout above (300 s) is its bound. Its wall time is not
    # asserted more tightly: it varies several-fold with the machine's load (an earlier < 60 s bound did).
    assert elapsed < 300, f"--quick took {elapsed:.0f}s"
    assert set(results) == {"setup", "vanilla", "deepseek"}
    for shape in ("vanilla", "deepseek"):
        assert set(results[shape]) == {"single"}
        table = results[shape]["single"]
        assert set(table) == set(bench.VARIANTS)
        for variant, row in table.items():
            for key in ("step_time_ratio", "cpu_time_ratio", "peak_mem_ratio", "saved_bytes_ratio",
                        "median_step_s", "median_step_cpu_s"):
                value = row[key]
                assert isinstance(value, float) and math.isfinite(value) and value > 0, (shape, variant, key, value)
            assert len(row["step_times_s"]) == results["setup"]["steps"]
            # identical weights and data in every variant: the LM loss agrees to round-off
            assert row["lm_loss_max_abs_diff_vs_lb"] <= 1e-5
            # static memory (params, grad buffer, AdamW state) is the same model in every variant
            assert row["static_bytes"] == table["lb"]["static_bytes"] > 0
        # the A/A control is the same model: the same bytes, to the byte
        assert table["lb_again"]["saved_bytes"] == table["lb"]["saved_bytes"]
        assert table["lb_again"]["peak_mem_ratio"] == 1.0


@pytest.mark.timeout(330)
def test_quick_run_ratios_recomputed_from_raw_measurements(quick_results):
    """Every ratio against lb's, recomputed from the raw measurements in the JSON (medians of the
    per-step times, bytes); on CPU the peak is the model: static + saved-for-backward bytes."""
    results, _ = quick_results
    for shape in ("vanilla", "deepseek"):
        table = results[shape]["single"]
        lb = table["lb"]
        for variant, row in table.items():
            where = (shape, variant)
            assert row["median_step_s"] == statistics.median(row["step_times_s"]), where
            assert row["step_time_ratio"] == pytest.approx(
                statistics.median(row["step_times_s"]) / statistics.median(lb["step_times_s"]), rel=1e-12), where
            assert row["cpu_time_ratio"] == pytest.approx(
                statistics.median(row["step_cpu_s"]) / statistics.median(lb["step_cpu_s"]), rel=1e-12), where
            assert row["saved_bytes_ratio"] == pytest.approx(row["saved_bytes"] / lb["saved_bytes"], rel=1e-12), where
            assert row["peak_mem_ratio"] == pytest.approx(row["peak_mem_bytes"] / lb["peak_mem_bytes"], rel=1e-12), where
            if row["peak_mem_measure"] != "cuda_max_memory_allocated":
                assert row["peak_mem_bytes"] == row["static_bytes"] + row["saved_bytes"], where


@pytest.mark.timeout(330)
def test_quick_run_sees_what_the_losses_save_for_backward(quick_results):
    results, _ = quick_results
    shapes = results["setup"]["shapes"]
    for shape in ("vanilla", "deepseek"):
        s = shapes[shape]
        table = results[shape]["single"]
        # R_sp keeps each token's k SwiGLU intermediates z [T, k, F] (fp32) for its backward, in every
        # MoE layer; stock megatron has no such tensor.
        tokens = s["seq_length"] * s["micro_batch_size"]
        z_bytes = tokens * s["moe_router_topk"] * s["moe_ffn_hidden_size"] * 4
        assert table["lb_sp"]["extra_saved_bytes"] >= s["num_layers"] * z_bytes, (shape, table["lb_sp"])
        assert table["lb_sp"]["peak_mem_ratio"] > 1.0
        # L_o keeps the k expert outputs y [T, k, H] likewise.
        y_bytes = tokens * s["moe_router_topk"] * s["hidden_size"] * 4
        assert table["lb_o"]["extra_saved_bytes"] >= s["num_layers"] * y_bytes, (shape, table["lb_o"])
        # every loss together saves more than R_sp alone
        assert table["all"]["saved_bytes"] > table["lb_sp"]["saved_bytes"]


# ----------------------------------------------------------------------------- the profile
def test_attributed_seconds_adds_ranges_and_backward_nodes_once():
    us = 1e6
    events = [("aten::mm", 9 * us), ("moe_spec/losses", 2 * us), ("moe_spec/routing_record", 0.5 * us),
              ("autograd::engine::evaluate_function: _TokenGramBackward", 1 * us),
              ("_TokenGramBackward", 0.75 * us),  # nested in the line above: not added again
              ("_UngateBackward", 0.25 * us),     # only the bare node recorded: counted
              ("autograd::engine::evaluate_function: MulBackward0", 4 * us)]
    got = profiling.attributed_seconds(events)
    assert got == {"moe_spec/losses": 2.0, "moe_spec/routing_record": 0.5, "_TokenGramBackward": 1.0,
                   "_UngateBackward": 0.25, "total": 3.75}
    assert profiling.attributed_seconds([("aten::mm", us)]) == {"total": 0.0}


@pytest.mark.timeout(330)
def test_quick_run_profile_names_the_time_of_each_loss(quick_results):
    """--profile: stock megatron (lb) runs none of our ranges; each loss shows up in the ranges and
    backward nodes its code runs through, as a share of its own profiled step."""
    results, _ = quick_results
    for shape in ("vanilla", "deepseek"):
        table = results[shape]["single"]
        seen = {n: {k for k, v in row["profile"]["ours_cpu_s"].items() if k != "total" and v > 0}
                for n, row in table.items()}
        for n in ("lb", "lb_again"):
            assert seen[n] == set() and table[n]["profile"]["ours_share_of_step"] == 0.0, (shape, n)
        record, exchange, loss = profiling.FORWARD_RANGES
        # R_sp: z is ungated and exchanged, its Gram kernel and ungate run backward
        assert seen["lb_sp"] == {record, exchange, loss, "_TokenGramBackward", "_UngateBackward",
                                 "_RowsToSlotsBackward"}, shape
        # R_cp and L_v need only the router's record: no rows are captured or exchanged
        assert seen["lb_cp"] == {record, loss} and seen["lb_v"] == {record, loss}, shape
        assert seen["lb_o"] == seen["lb_sp"], shape  # L_o: y through the same exchange and kernels
        for n, row in table.items():
            p = row["profile"]
            assert p["ours_cpu_s"]["total"] == pytest.approx(sum(v for k, v in p["ours_cpu_s"].items() if k != "total"))
            assert 0.0 <= p["ours_share_of_step"] < 1.0, (shape, n, p)
            assert p["implied_ratio_at_least"] == pytest.approx(1 / (1 - p["ours_share_of_step"])), (shape, n)
