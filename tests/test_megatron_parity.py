"""Stock megatron-core on the CPU backend: every parallel layout equals one process.

A tiny GPT with MoE (4 layers, hidden 64, 8 experts, top-2, SwiGLU) takes one training step through
megatron's own schedule, DDP and grad finalization; the LM loss and the full (gathered) gradients
must equal the one-process run's to rtol 1e-5. The one-process run also provides the initial weights
of every layout.
"""
import pytest
import torch

from megatron_moe_spec.testing.compare import assert_same_step, tensor_mismatches
from megatron_moe_spec.testing.distributed import ParallelSizes, run_distributed
from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, train_step_result

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(600)]

VANILLA = TinyGPTSettings()
SHARED = TinyGPTSettings(moe_shared_expert_intermediate_size=64, num_moe_experts=4)


_REFERENCES = {}


def reference(settings: TinyGPTSettings, data_parallel_size: int):
    """The one-process run over the micro-batches of ``data_parallel_size`` ranks (cached)."""
    single = settings.replace(num_microbatches=settings.num_microbatches * data_parallel_size)
    key = repr(single)
    if key not in _REFERENCES:
        _REFERENCES[key] = run_distributed(train_step_result, 1, ParallelSizes(), args=(single,))[0]
    return _REFERENCES[key]


def run_parallel(settings, world_size, parallel, data_parallel_size):
    ref = reference(settings, data_parallel_size)
    results = run_distributed(
        train_step_result, world_size, parallel, args=(settings,),
        kwargs={"initial_params": ref["params"]},
    )
    return ref, results


# (name, settings, world size, parallel sizes, data-parallel size of the dense part)
LAYOUTS = [
    ("tp2_sp", VANILLA, 2, ParallelSizes(tp=2), 1),
    ("ep2_alltoall", VANILLA, 2, ParallelSizes(ep=2), 2),
    ("ep2_allgather", VANILLA.replace(moe_token_dispatcher_type="allgather"), 2, ParallelSizes(ep=2), 2),
    ("tp2_ep2", VANILLA, 4, ParallelSizes(tp=2, ep=2), 2),
    ("ep2_etp2", VANILLA, 4, ParallelSizes(ep=2, etp=2), 4),
    ("pp2_1f1b", VANILLA.replace(num_microbatches=4), 2, ParallelSizes(pp=2), 1),
    ("pp2_vpp2_interleaved", VANILLA.replace(num_microbatches=4), 2, ParallelSizes(pp=2, vpp=2), 1),
    ("shared_expert_tp2_sp", SHARED, 2, ParallelSizes(tp=2), 1),
    ("shared_expert_ep2", SHARED, 2, ParallelSizes(ep=2), 2),
]


@pytest.mark.parametrize("name,settings,world_size,parallel,dp", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_layout_matches_one_process(name, settings, world_size, parallel, dp):
    ref, results = run_parallel(settings, world_size, parallel, dp)
    for rank, result in enumerate(results):
        # Every rank starts from the reference weights and ends with the reference gradients.
        assert not tensor_mismatches(ref["params"], result["params"], rtol=0.0), f"rank {rank} params"
        assert_same_step(ref, result, rtol=1e-5)


def logged_z_loss(settings):
    """One step; megatron's own tracker reduction (with the groups megatron recorded); this rank's
    logged z_loss per layer."""
    from megatron_moe_spec.core import moe_tracker
    from megatron_moe_spec.testing.tiny_gpt import build_model, build_transformer_config, local_microbatches, run_step

    config = build_transformer_config(settings)
    chunks = build_model(config, settings)
    run_step(chunks, config, local_microbatches(settings), settings)
    moe_tracker.sync(["z_loss", "load_balancing_loss"])
    values = {name: moe_tracker.values(name).tolist() for name in ("z_loss", "load_balancing_loss")}
    moe_tracker.clear()
    return values


def _megatron_core_at_least(version: str) -> bool:
    from packaging.version import Version

    from megatron_moe_spec.core.version import megatron_core_version

    return megatron_core_version() >= Version(version)


def test_megatron_logs_z_loss_per_tp_rank_unreduced():
    """Documents megatron-core's z-loss logging under TP+SP (docs/parallelism.md). Up to 0.18 the z-loss
    is recorded without any group, so each rank logs the z-loss of its own sequence shard; from 0.19
    (PR #3199) it is averaged over TPxDPxCP, so every rank logs the one-process value. The
    load-balancing loss is reduced over TP and agrees on every rank on all versions. (The z-loss
    *gradient* is right on all versions: the coefficient is divided by the TP size and the per-shard
    losses add up; see the parity tests.)"""
    settings = VANILLA.replace(moe_z_loss_coeff=1e-3)
    single = run_distributed(logged_z_loss, 1, ParallelSizes(), args=(settings,))[0]
    tp = run_distributed(logged_z_loss, 2, ParallelSizes(tp=2), args=(settings,))
    z0, z1, z_ref = tp[0]["z_loss"], tp[1]["z_loss"], single["z_loss"]
    assert any(c != 0 for c in z_ref)
    if _megatron_core_at_least("0.19.0"):
        for a, b, c in zip(z0, z1, z_ref):
            assert a == b and abs(a - c) <= 1e-5 * abs(c)
    else:
        assert any(abs(a - b) > 1e-6 * abs(c) for a, b, c in zip(z0, z1, z_ref)), "TP ranks logged the same z_loss"
        # Each rank logs the mean over its half of the tokens: their average is the one-process value.
        for a, b, c in zip(z0, z1, z_ref):
            assert abs((a + b) / 2 - c) <= 1e-5 * abs(c)
    for a, b in zip(tp[0]["load_balancing_loss"], tp[1]["load_balancing_loss"]):
        assert a == b


def test_megatron_lb_loss_scale_changes_with_per_token_loss_under_tp():
    """Documents megatron-core's load-balancing scale under calculate_per_token_loss and TP=2 (sequence
    parallel; docs/parallelism.md). Up to 0.18 the loss is multiplied by the token count of the rank's
    sequence shard while finalize_model_grads divides by the full sequence's, so the load-balancing
    part of the router gradient is exactly half of the ordinary run's. From 0.19 (PR #5047) it is
    also multiplied by the TPxCP size, and the part equals the ordinary run's."""
    router = "decoder.layers.mlp.router.weight"
    with_lb = VANILLA.replace(moe_aux_loss_coeff=0.1)
    without_lb = VANILLA.replace(moe_aux_loss_coeff=0.0)
    ref_with = reference(with_lb, 1)
    ref_without = reference(without_lb, 1)
    per_token = run_distributed(train_step_result, 2, ParallelSizes(tp=2),
                                args=(with_lb.replace(calculate_per_token_loss=True),),
                                kwargs={"initial_params": ref_with["params"]})[0]
    lb_part = ref_with["grads"][router] - ref_without["grads"][router]
    per_token_lb_part = per_token["grads"][router] - ref_without["grads"][router]
    assert float(lb_part.abs().max()) > 0
    expected = lb_part if _megatron_core_at_least("0.19.0") else 0.5 * lb_part
    assert torch.allclose(per_token_lb_part, expected, rtol=1e-3, atol=1e-5 * float(lb_part.abs().max()))
