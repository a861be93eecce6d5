"""The multi-rank harness itself: results per rank, loud failures, no hangs, and that the parity
comparison really catches a broken shard."""
import time

import pytest
import torch

from megatron_moe_spec.testing.compare import tensor_mismatches
from megatron_moe_spec.testing.distributed import ParallelSizes, RankFailure, run_distributed
from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, train_step_result

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(300)]


def report_groups():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return {
        "rank": dist.get_rank(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "ep_rank": ps.get_expert_model_parallel_rank(),
        "sum": _all_reduce_rank(),
    }


def _all_reduce_rank():
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return float(t)


def raise_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one is broken on purpose")
    return "ok"


def hang_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(3600)
    return "ok"


def test_results_come_back_per_rank_with_megatron_groups():
    results = run_distributed(report_groups, 4, ParallelSizes(tp=2, ep=2), timeout=120)
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert all(r["tp"] == 2 and r["ep"] == 2 and r["dp"] == 2 for r in results)
    assert [r["tp_rank"] for r in results] == [0, 1, 0, 1]
    assert all(r["sum"] == 6.0 for r in results)


def test_a_raising_rank_fails_loudly_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank one is broken on purpose"):
        run_distributed(raise_on_rank_one, 2, timeout=120)
    assert time.monotonic() - start < 100


def test_a_hanging_rank_times_out_and_names_the_rank():
    # The timeout leaves rank 0 ample time to start up (spawn + imports) on a loaded 2-core machine.
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish within 45s"):
        run_distributed(hang_on_rank_one, 2, timeout=45)
    assert time.monotonic() - start < 100


def train_step_with_broken_tp_reduction(settings, initial_params):
    """One step with the sequence-parallel reduce-scatter not reducing (each rank keeps only its own
    partial sum): the kind of wrong TP reduction the parity tests exist to catch."""
    from megatron.core.tensor_parallel import mappings

    def no_reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        chunk = input_.shape[0] // group.size()
        return input_[group.rank() * chunk : (group.rank() + 1) * chunk].clone()

    mappings._reduce_scatter_along_first_dim = no_reduce_scatter
    return train_step_result(settings, initial_params=initial_params)


def test_parity_catches_a_broken_tp_reduction():
    settings = TinyGPTSettings()
    ref = run_distributed(train_step_result, 1, ParallelSizes(), args=(settings,))[0]
    good = run_distributed(train_step_result, 2, ParallelSizes(tp=2), args=(settings,),
                           kwargs={"initial_params": ref["params"]})[0]
    broken = run_distributed(train_step_with_broken_tp_reduction, 2, ParallelSizes(tp=2),
                             args=(settings, ref["params"]))[0]
    assert not tensor_mismatches(ref["grads"], good["grads"], rtol=1e-5)
    problems = tensor_mismatches(ref["grads"], broken["grads"], rtol=1e-5)
    assert problems, "a broken TP reduction went unnoticed"
    assert abs(broken["lm_loss"] - ref["lm_loss"]) > 1e-5 * abs(ref["lm_loss"])
