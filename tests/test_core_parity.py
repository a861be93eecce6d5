"""The specialization losses inside megatron-core under every parallel layout equal one process.

A tiny GPT-MoE with all four losses on (and the metrics) takes one training step through megatron's
schedule, DDP and grad finalization. Under each layout, the LM loss, the full (gathered) gradients of
every parameter, the per-layer values of every loss in megatron's tracker (after megatron's own
cross-rank reduction) and the reduced routing metrics equal the one-process run's (rtol 1e-5).

The same spawned run then takes the step once per loss with only that loss on, the LM loss weighted
0 and megatron's load balancing off (tiny_gpt.losses_only_grads): each loss's own gradient is
compared with the one-process run's with a tolerance relative to *its* size (rtol 1e-5 of each
tensor's largest entry + 1e-7 of the loss's largest gradient), so an error in one loss's gradient
cannot hide under the LM's share of the full gradient, nor under a larger loss's (L_o's gradient is
~1e-5 of R_sp's at these coefficients).
The one-process run is itself checked against an independent computation in test_core_independent.
"""
import functools

import pytest

from megatron_moe_spec.core.layer_specs import get_moe_block_spec
from megatron_moe_spec.specialization_config import SpecializationConfig
from megatron_moe_spec.testing.compare import assert_same_step, tensor_mismatches
from megatron_moe_spec.testing.distributed import ParallelSizes, run_distributed
from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, train_step_result

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(900)]

ALL_LOSSES = SpecializationConfig(sp_coeff=0.05, cp_coeff=0.05, ortho_coeff=0.05, var_coeff=0.05, metrics=True)
NO_CP = SpecializationConfig(sp_coeff=0.05, ortho_coeff=0.05, var_coeff=0.05, metrics=True)

VANILLA = TinyGPTSettings(num_moe_experts=4, moe_ffn_hidden_size=32)
DEEPSEEK = TinyGPTSettings(num_moe_experts=8, moe_router_topk=4, moe_ffn_hidden_size=16,
                           moe_shared_expert_intermediate_size=32, moe_layer_freq=[0, 1, 1, 1])

_REFERENCES = {}


def spec_fn(spec_config):
    return functools.partial(get_moe_block_spec, spec_config=spec_config)


COEFFS = ("sp_coeff", "cp_coeff", "ortho_coeff", "var_coeff")


def each_loss_alone(spec_config):
    """One layer spec per loss of ``spec_config``, with only that loss on (same coefficient)."""
    return {name: spec_fn(SpecializationConfig(**{name: getattr(spec_config, name)}))
            for name in COEFFS if getattr(spec_config, name)}


def reference(settings, spec_config, dp):
    """One process, the micro-batches of all ``dp`` ranks, and never recomputation (recompute must
    not change the math: comparing with a recomputed reference could hide a shared mistake)."""
    single = settings.replace(num_microbatches=settings.num_microbatches * dp, recompute_granularity=None,
                              recompute_method=None, recompute_num_layers=None, recompute_modules=None,
                              calculate_per_token_loss=False)
    key = (repr(single), repr(spec_config))
    if key not in _REFERENCES:
        _REFERENCES[key] = run_distributed(train_step_result, 1, ParallelSizes(),
                                           args=(single, spec_fn(spec_config)),
                                           kwargs={"alone": each_loss_alone(spec_config)})[0]
    return _REFERENCES[key]


def assert_alone_grads_match(ref, result, rank):
    """Each loss alone (LM weight 0): this rank's gradients equal one process's, relative to that loss's
    own gradients (+ 1e-7 of its largest: round-off on a tensor the loss does not reach, e.g. R_sp's on
    the last router is ~1e-9 of its largest and differs across layouts)."""
    for loss, grads in ref["alone_grads"].items():
        largest = max(float(g.abs().max()) for g in grads.values())
        problems = tensor_mismatches(grads, result["alone_grads"][loss], rtol=1e-5, atol=1e-7 * largest)
        assert not problems, (f"rank {rank}: the gradient of {loss} alone differs from one process:\n  "
                              + "\n  ".join(problems))


def assert_close_values(ref, got, what, rtol=1e-5):
    assert set(ref) == set(got), f"{what}: names {sorted(got)} != {sorted(ref)}"
    for name in ref:
        for i, (a, b) in enumerate(zip(ref[name], got[name])):
            assert abs(a - b) <= rtol * max(abs(a), 1e-6), f"{what} {name} layer {i}: {b} != {a}"


def assert_close_metrics(ref, got, rtol=1e-5, missing_pairs=()):
    """Every reported metric equals the reference; pathway metrics of pairs that cross a pipeline
    stage boundary (``missing_pairs``, 1-based layer numbers) must be absent, and nothing else."""
    scalars = [k for k, v in ref.items() if isinstance(v, float)]
    assert scalars, "no metrics were reported"
    missing = {f"pathway_nmi/layer_{a - 1}" for a, _ in missing_pairs}
    if missing and all(k in missing for k in scalars if k.startswith("pathway_nmi/")):
        missing.add("pathway_nmi")  # no pair observed at all: no mean either
    assert {k for k in scalars if k not in got} == missing
    if missing:
        scalars = [k for k in scalars if k not in missing and k != "pathway_nmi"]
    for key in scalars:
        assert abs(ref[key] - got[key]) <= rtol * max(abs(ref[key]), 1e-6), f"metric {key}: {got[key]} != {ref[key]}"


def cross_stage_pairs(settings, parallel):
    """Adjacent MoE layer pairs on different stages/chunks (their pathway statistic is not observed)."""
    if parallel.pp == 1:
        return []
    freq = settings.moe_layer_freq
    moe = [i + 1 for i in range(settings.num_layers) if (freq[i] if isinstance(freq, list) else i % freq == 0)]
    chunks = parallel.pp * (parallel.vpp or 1)
    per_chunk = settings.num_layers // chunks
    return [(a, b) for a, b in zip(moe[:-1], moe[1:]) if (a - 1) // per_chunk != (b - 1) // per_chunk]


LAYOUTS = [
    # name, settings, spec, world, parallel, dp of the dense part
    ("tp2_sp", VANILLA, ALL_LOSSES, 2, ParallelSizes(tp=2), 1),
    ("ep2_alltoall", VANILLA, ALL_LOSSES, 2, ParallelSizes(ep=2), 2),
    ("ep2_allgather", VANILLA.replace(moe_token_dispatcher_type="allgather"), ALL_LOSSES, 2, ParallelSizes(ep=2), 2),
    ("tp2_ep2", VANILLA, ALL_LOSSES, 4, ParallelSizes(tp=2, ep=2), 2),
    # Expert tensor parallelism: F split over 2 ranks (tp=1, so etp != tp, which megatron-core
    # supports together with ep > 1; with ep=1 it all-reduces the shards as dense weights).
    ("ep2_etp2_alltoall", VANILLA, ALL_LOSSES, 4, ParallelSizes(ep=2, etp=2), 4),
    ("ep2_etp2_allgather", VANILLA.replace(moe_token_dispatcher_type="allgather"), ALL_LOSSES, 4,
     ParallelSizes(ep=2, etp=2), 4),
    ("dp2_microbatches2", VANILLA.replace(num_microbatches=2), ALL_LOSSES, 2, ParallelSizes(), 2),
    ("pp2_1f1b", VANILLA.replace(num_microbatches=4), NO_CP, 2, ParallelSizes(pp=2), 1),
    ("full_recompute_ep2", VANILLA.replace(recompute_granularity="full", recompute_method="uniform",
                                           recompute_num_layers=1), ALL_LOSSES, 2, ParallelSizes(ep=2), 2),
    ("full_recompute_2_layers_dp2", VANILLA.replace(recompute_granularity="full", recompute_method="uniform",
                                                    recompute_num_layers=2, num_microbatches=2),
     ALL_LOSSES, 2, ParallelSizes(), 2),
    ("moe_recompute_tp2", VANILLA.replace(recompute_granularity="selective", recompute_modules=["moe"]),
     ALL_LOSSES, 2, ParallelSizes(tp=2), 1),
    ("moe_recompute_pp2_1f1b", VANILLA.replace(recompute_granularity="selective", recompute_modules=["moe"],
                                               num_microbatches=4), NO_CP, 2, ParallelSizes(pp=2), 1),
    ("deepseek_tp2_sp", DEEPSEEK, ALL_LOSSES, 2, ParallelSizes(tp=2), 1),
    # Per-token loss: megatron scales the whole gradient by 1/num_tokens in finalize_model_grads and
    # the aux losses by token counts; with equal token counts per micro-batch the gradients equal the
    # ordinary run's (the reference is always computed without per-token loss). megatron-core 0.16.1's
    # own load-balancing loss does not keep its scale under per-token loss with TP
    # (test_megatron_lb_loss_scale_changes_with_per_token_loss_under_tp), so it is off here.
    ("per_token_loss_tp2_ep2", VANILLA.replace(calculate_per_token_loss=True, moe_aux_loss_coeff=0.0),
     ALL_LOSSES, 4, ParallelSizes(tp=2, ep=2), 2),
    ("per_token_loss_dp2_microbatches2", VANILLA.replace(calculate_per_token_loss=True, num_microbatches=2),
     ALL_LOSSES, 2, ParallelSizes(), 2),
    # Interleaved 1F1B: 2 stages x 2 model chunks of one layer each (every R_cp pair crosses a chunk).
    ("pp2_vpp2_interleaved", VANILLA.replace(num_microbatches=4), NO_CP, 2, ParallelSizes(pp=2, vpp=2), 1),
    # A first stage without any MoE layer: the tracker names must exist there too, or the
    # pipeline-wide reduction of megatron's tracker hangs.
    ("pp2_dense_first_stage", VANILLA.replace(num_microbatches=2, moe_layer_freq=[0, 0, 1, 1]), NO_CP, 2,
     ParallelSizes(pp=2), 1),
    ("deepseek_ep2_alltoall", DEEPSEEK, ALL_LOSSES, 2, ParallelSizes(ep=2), 2),
    ("deepseek_ep2_allgather", DEEPSEEK.replace(moe_token_dispatcher_type="allgather"), ALL_LOSSES, 2,
     ParallelSizes(ep=2), 2),
]


@pytest.mark.parametrize("name,settings,spec,world,parallel,dp", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_losses_match_one_process(name, settings, spec, world, parallel, dp):
    ref = reference(settings, spec, dp)
    results = run_distributed(train_step_result, world, parallel, args=(settings, spec_fn(spec)),
                              kwargs={"initial_params": ref["params"], "alone": each_loss_alone(spec)})
    for name_, coeff in (("specialization_loss", spec.sp_coeff), ("coupling_loss", spec.cp_coeff),
                         ("orthogonality_loss", spec.ortho_coeff), ("variance_loss", spec.var_coeff)):
        if coeff:
            assert any(v != 0 for v in ref["tracker"][name_]), f"{name_} was not logged"
    # Each loss alone has a gradient, and only its own (no LM share: the output layer gets none).
    assert set(ref["alone_grads"]) == set(each_loss_alone(spec))
    for loss, grads in ref["alone_grads"].items():
        assert any(float(g.abs().max()) > 0 for g in grads.values()), f"{loss} alone has no gradient"
        assert all(float(g.abs().max()) == 0 for k, g in grads.items() if k.startswith("output_layer")), loss
    for rank, result in enumerate(results):
        assert_same_step(ref, result, rtol=1e-5)
        assert_alone_grads_match(ref, result, rank)
        assert_close_values(ref["tracker"], result["tracker"], f"rank {rank} tracker")
        assert_close_metrics(ref["metrics"], result["metrics"],
                             missing_pairs=cross_stage_pairs(settings, parallel))
