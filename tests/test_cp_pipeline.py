"""R_cp across pipeline stages (``cp_pipeline: exact``): value and every gradient equal one process.

A tiny all-MoE model with R_cp alone (LM weighted as usual, load balancing off) under each pipeline
schedule and option; the one-process run never pipelines nor recomputes. The R_cp-only gradient (the
difference with an identical run without R_cp) is compared relative to its own size, so a pair that is
left out or mis-scaled cannot hide behind the LM gradient.
"""
import functools

import pytest

from megatron_moe_spec.core.layer_specs import get_moe_block_spec
from megatron_moe_spec.specialization_config import SpecializationConfig
from megatron_moe_spec.testing.compare import assert_same_step
from megatron_moe_spec.testing.distributed import ParallelSizes, run_distributed
from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, train_step_result

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(900)]

CP = SpecializationConfig(cp_coeff=0.5, metrics=True)
OFF = SpecializationConfig(metrics=True)
BASE = TinyGPTSettings(num_moe_experts=4, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.0, num_microbatches=4)
NO_RECOMPUTE = dict(recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
                    recompute_modules=None)


def spec_fn(spec_config):
    return functools.partial(get_moe_block_spec, spec_config=spec_config)


_REFERENCES = {}


def reference(settings, dp):
    """One process, the micro-batches of all ``dp`` ranks, no pipeline and no recomputation."""
    single = settings.replace(**NO_RECOMPUTE, num_microbatches=settings.num_microbatches * dp, extra_config={
        k: v for k, v in settings.extra_config.items() if k != "deallocate_pipeline_outputs"})
    key = repr(single)
    if key not in _REFERENCES:
        on = run_distributed(train_step_result, 1, ParallelSizes(), args=(single, spec_fn(CP)))[0]
        off = run_distributed(train_step_result, 1, ParallelSizes(), args=(single, spec_fn(OFF)),
                              kwargs={"initial_params": on["params"]})[0]
        _REFERENCES[key] = (on, off)
    return _REFERENCES[key]


def assert_cp_gradient_matches(ref_on, ref_off, got_on, rtol=1e-5):
    """(got - off) equals (ref - off) for every parameter, relative to R_cp's own gradient (plus fp32
    round-off of the full gradient, 1e-6 of it: a different reduction order of the LM gradient)."""
    checked = 0
    for key, ref_grad in ref_on["grads"].items():
        own = ref_grad - ref_off["grads"][key]
        got = got_on["grads"][key] - ref_off["grads"][key]
        scale = float(own.abs().max())
        if scale > 0:
            checked += 1
        assert float((got - own).abs().max()) <= rtol * max(scale, 1e-12) + 1e-6 * float(ref_grad.abs().max()), key
    assert checked > 0


LAYOUTS = [
    # name, settings, parallel sizes, world, dp of the dense part
    ("pp2_1f1b", BASE, ParallelSizes(pp=2), 2, 1),
    ("pp2_vpp2_interleaved", BASE, ParallelSizes(pp=2, vpp=2), 2, 1),
    ("pp2_dense_middle", BASE.replace(moe_layer_freq=[1, 0, 0, 1]), ParallelSizes(pp=2), 2, 1),
    ("pp2_ep2", BASE, ParallelSizes(pp=2, ep=2), 4, 2),
    ("pp2_deallocate_outputs", BASE.replace(extra_config={"deallocate_pipeline_outputs": True}),
     ParallelSizes(pp=2), 2, 1),
    ("pp2_full_recompute", BASE.replace(recompute_granularity="full", recompute_method="uniform",
                                        recompute_num_layers=1), ParallelSizes(pp=2), 2, 1),
    ("pp2_moe_recompute", BASE.replace(recompute_granularity="selective", recompute_modules=["moe"]),
     ParallelSizes(pp=2), 2, 1),
]


@pytest.mark.parametrize("name,settings,parallel,world,dp", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_cross_stage_coupling_matches_one_process(name, settings, parallel, world, dp):
    ref_on, ref_off = reference(settings, dp)
    assert any(v != 0 for v in ref_on["tracker"]["coupling_loss"])
    results = run_distributed(train_step_result, world, parallel, args=(settings, spec_fn(CP)),
                              kwargs={"initial_params": ref_on["params"]})
    for rank, result in enumerate(results):
        assert_same_step(ref_on, result, rtol=1e-5)
        assert_cp_gradient_matches(ref_on, ref_off, result)
        for i, (a, b) in enumerate(zip(ref_on["tracker"]["coupling_loss"], result["tracker"]["coupling_loss"])):
            assert abs(a - b) <= 1e-5 * max(abs(a), 1e-6), f"rank {rank} coupling_loss layer {i}: {b} != {a}"
        for key, value in ref_on["metrics"].items():  # the pathway of a crossing pair is observed too
            if isinstance(value, float):
                assert abs(result["metrics"][key] - value) <= 1e-5 * max(abs(value), 1e-6), key


def train_eval_train(settings, spec_config):
    """A training step, a forward-only evaluation pass (eval mode: nothing travels), a train-mode
    no-grad forward-only pass (values travel, no gradient), then a training step: returns the R_cp
    values logged by the two steps. A stage that sent or waited for a value the other did not would
    hang (and the harness times out)."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_moe_spec.core.moe_layer import SpecializationMoELayer
    from megatron_moe_spec.testing import tiny_gpt

    from megatron_moe_spec.core import stage_transport

    config = tiny_gpt.build_transformer_config(settings)
    torch.manual_seed(1234)
    chunks = tiny_gpt.build_model(config, settings, spec_fn(spec_config))
    batches = tiny_gpt.local_microbatches(settings)
    values, sent = [], []
    real_send = stage_transport.send

    def counting_send(tensor, pipeline_rank, stream):
        sent.append((stream % 2, tensor.numel()))
        return real_send(tensor, pipeline_rank, stream)

    stage_transport.send = counting_send
    for mode in ("train", "eval", "no_grad", "train"):
        for chunk in chunks:
            chunk.train(mode != "eval")
            for m in chunk.modules():
                if isinstance(m, SpecializationMoELayer):
                    m.begin_step(metrics=False)
        if mode == "train":
            tiny_gpt.run_step(chunks, config, batches, settings)
            values.append(tiny_gpt.tracker_values(settings.num_microbatches, config.num_layers)["coupling_loss"])
            if len(values) == 1:  # the side channel's traffic of one training step
                values.append({"forward": sum(n for d, n in sent if d == 0),
                               "backward": sum(n for d, n in sent if d == 1)})
            continue
        with torch.no_grad():
            iterators = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
            get_forward_backward_func()(
                forward_step_func=tiny_gpt.lm_forward_step, data_iterator=iterators,
                model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(batches),
                seq_length=settings.seq_length, micro_batch_size=settings.micro_batch_size, forward_only=True)
    stage_transport.send = real_send
    return values


@pytest.mark.parametrize("parallel,crossing_pairs", [(ParallelSizes(pp=2), 1), (ParallelSizes(pp=2, vpp=2), 3)],
                         ids=["pp2", "pp2_vpp2"])
def test_evaluation_and_no_grad_passes_keep_the_stages_in_step(parallel, crossing_pairs):
    """Also the side channel's traffic per training step: 3 T values forward and T backward per
    crossing pair and micro-batch (T = tokens of a micro-batch), summed over the two stages."""
    results = run_distributed(train_eval_train, 2, parallel, args=(BASE, CP), timeout=300)
    tokens = BASE.seq_length * BASE.micro_batch_size
    per_pair = crossing_pairs * BASE.num_microbatches
    assert sum(r[1]["forward"] for r in results) == 3 * tokens * per_pair
    assert sum(r[1]["backward"] for r in results) == tokens * per_pair
    for first, _, second in results:
        assert any(v != 0 for v in first) and any(v != 0 for v in second)


def test_skip_warns_once_with_the_log_indices(caplog):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_spec.core import layer_specs

    config = TransformerConfig(num_layers=4, hidden_size=8, num_attention_heads=2, num_moe_experts=4,
                               moe_ffn_hidden_size=8, pipeline_model_parallel_size=2,
                               pipeline_dtype=torch.float32)
    layer_specs._WARNED_PAIRS.clear()
    with caplog.at_level("WARNING"):
        for _ in range(3):  # once per model chunk and rank in a real run
            layer_specs.warn_cross_stage_pairs(config, [1, 2, 3, 4])
    warnings = [r.getMessage() for r in caplog.records if "cp_pipeline: skip" in r.getMessage()]
    assert len(warnings) == 1 and "(1, 2)" in warnings[0], warnings  # layers 2 and 3, 1-based
