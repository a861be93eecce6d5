"""The losses on megatron-core's HybridModel (core.hybrid), one process, CPU backend.

- off: the stack spec comes back unchanged;
- a GPT MoE model and its HybridModel equivalent ``*E*E`` (weights mapped as in megatron's migration
  guide: GPT layer i's attention -> hybrid layer 2i, its pre-MLP norm and MoE -> 2i + 1, final norm ->
  ``final_norm``) give identical LM loss, losses and gradients; each loss alone too, relative to its
  own gradient;
- R_cp pairs the two ``E`` layers of ``*E-*E`` across the dense and attention layers between them
  (against an independent float64 R_cp from the layers' inputs and router weights);
- recomputation under HybridStack against the same model without it;
- refusals: M / G without their kernels, D, '|' segments that do not fit the pipeline layout, bad patterns.

HybridModel exists from megatron-core 0.19 on: on older versions every test here but the import one
skips (the reason says so).
"""
import dataclasses
import re

import pytest
import torch

from megatron_moe_spec.core.version import megatron_core_version
from megatron_moe_spec.specialization_config import SpecializationConfig
from megatron_moe_spec.testing.hybrid import (
    ALL_ON, COEFF_FIELD, NAMES, QUIET, assert_grads_match, fresh_tracker, gpt_to_hybrid_key, load_mapped,
    reference_coupling)
from megatron_moe_spec.testing.hybrid import run_step as run
from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, build_transformer_config

pytestmark = pytest.mark.timeout(300)

HAVE_HYBRID = megatron_core_version().release[:2] >= (0, 19)
requires_hybrid = pytest.mark.skipif(
    not HAVE_HYBRID, reason=f"HybridModel (megatron.core.models.hybrid) is megatron-core >= 0.19 only; "
                            f"installed {megatron_core_version()}")

SETTINGS = TinyGPTSettings(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=32,
                           num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
                           micro_batch_size=2, seq_length=8, vocab_size=64)


def test_module_imports_on_every_version():
    """megatron_moe_spec.core.hybrid imports on every megatron-core; before 0.19 its entry points say why not."""
    from megatron_moe_spec.core import hybrid

    assert hybrid.HAVE_HYBRID == HAVE_HYBRID
    assert hybrid.hybrid_moe_layer_numbers("*E-*|E/E") == [2, 5]
    if not HAVE_HYBRID:
        with pytest.raises(ImportError, match="megatron-core >= 0.19"):
            hybrid.local_hybrid_stack_spec()


# ----------------------------------------------------------------------------- building and running
def _config(settings, **changes):
    return dataclasses.replace(build_transformer_config(settings), **changes) if changes else \
        build_transformer_config(settings)


def build_gpt(settings, spec):
    from megatron.core.models.gpt import GPTModel

    from megatron_moe_spec.core.layer_specs import get_moe_block_spec

    fresh_tracker()
    config = _config(settings)
    torch.manual_seed(1234)
    return GPTModel(config=config, transformer_layer_spec=get_moe_block_spec(config, spec, use_transformer_engine=False),
                    vocab_size=settings.vocab_size, max_sequence_length=settings.seq_length,
                    share_embeddings_and_output_weights=False, position_embedding_type="rope")


def build_hybrid(settings, spec, pattern):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megatron_moe_spec.core.hybrid import get_hybrid_stack_spec, hybrid_layer_count

    fresh_tracker()
    config = _config(settings.replace(num_layers=hybrid_layer_count(pattern)))
    torch.manual_seed(4321)
    stack = get_hybrid_stack_spec(config, spec, hybrid_layer_pattern=pattern, use_transformer_engine=False)
    return HybridModel(config=config, hybrid_stack_spec=stack, vocab_size=settings.vocab_size,
                       max_sequence_length=settings.seq_length, hybrid_layer_pattern=pattern,
                       share_embeddings_and_output_weights=False, position_embedding_type="rope")


def gpt_and_hybrid(settings, spec, lm_weight=1.0):
    gpt = build_gpt(settings, spec)
    gpt_result = run(gpt, settings, lm_weight)
    hybrid = build_hybrid(settings, spec, "*E" * settings.num_layers)
    load_mapped(hybrid, gpt)
    return gpt_result, run(hybrid, settings, lm_weight)


# ----------------------------------------------------------------------------- 1. off
@requires_hybrid
def test_off_returns_the_spec_unchanged(megatron_single_process):
    from megatron.core.models.hybrid import hybrid_layer_specs

    from megatron_moe_spec.core.hybrid import get_hybrid_stack_spec, local_hybrid_stack_spec, specialize_hybrid_stack_spec

    config = _config(SETTINGS.replace(num_layers=4))
    megatrons = hybrid_layer_specs.hybrid_stack_spec
    assert get_hybrid_stack_spec(config, SpecializationConfig(), "*E*E", use_transformer_engine=True) is megatrons
    assert specialize_hybrid_stack_spec(megatrons, config, SpecializationConfig(), "*E*E") is megatrons
    local = local_hybrid_stack_spec(config)
    assert get_hybrid_stack_spec(config, None, base_spec=local) is local
    # On, megatron's own spec object is left alone (a new spec is returned).
    before = megatrons.submodules.moe_layer
    ours = specialize_hybrid_stack_spec(megatrons, config, SpecializationConfig(sp_coeff=1e-3), "*E*E")
    assert ours is not megatrons and megatrons.submodules.moe_layer is before
    assert ours.module.__name__ == "SpecializationHybridStack"
    assert ours.submodules.moe_layer.module.__name__ == "SpecializationMoETransformerLayer"


# ----------------------------------------------------------------------------- 2. GPT == *E*E
@requires_hybrid
def test_gpt_and_its_hybrid_equivalent_match(megatron_single_process):
    """All four losses on, LM loss and megatron's load balancing too: identical LM loss, identical R_sp,
    R_cp, L_o, L_v per layer (GPT layer i's under hybrid index 2i + 1), identical gradients."""
    (gpt_lm, gpt_grads, gpt_tracker), (hy_lm, hy_grads, hy_tracker) = gpt_and_hybrid(SETTINGS, ALL_ON)
    assert gpt_lm == pytest.approx(hy_lm, rel=1e-6, abs=0)
    for name in NAMES:
        gpt_values, hy_values = gpt_tracker[name], hy_tracker[name]
        assert len(hy_values) == 2 * len(gpt_values)
        assert torch.allclose(hy_values[1::2], gpt_values, rtol=1e-6, atol=1e-9), (name, gpt_values, hy_values)
        assert float(hy_values[0::2].abs().sum()) == 0.0, (name, hy_values)  # attention layers log nothing
    assert float(gpt_tracker["coupling_loss"][0]) != 0.0  # the pair (GPT 0, 1) = hybrid (1, 3)
    assert_grads_match(gpt_grads, hy_grads, 1e-5, "all losses + LM")


@requires_hybrid
@pytest.mark.parametrize("name", NAMES)
def test_each_loss_alone_matches_gpt(megatron_single_process, name):
    """One loss on, LM weight 0, no load balancing: the gradient is that loss's alone, and the hybrid
    model's equals GPT's relative to each parameter's own gradient of that loss."""
    spec = SpecializationConfig(**{COEFF_FIELD[name]: 0.5})
    settings = SETTINGS.replace(**QUIET)
    (_, gpt_grads, gpt_tracker), (_, hy_grads, hy_tracker) = gpt_and_hybrid(settings, spec, lm_weight=0.0)
    assert torch.allclose(hy_tracker[name][1::2], gpt_tracker[name], rtol=1e-6, atol=1e-9)
    assert_grads_match(gpt_grads, hy_grads, 1e-5, name)
    # The loss reaches the routers (R_sp only the first layer's: the gate multiplies nothing it sees)
    # and the experts: the check above had something to see.
    routers = [n for n, g in gpt_grads.items() if "router" in n and float(g.abs().max()) > 0]
    experts = [n for n, g in gpt_grads.items() if "local_experts" in n and float(g.abs().max()) > 0]
    assert routers and experts, (name, routers, experts)


@requires_hybrid
def test_metrics_match_gpt(megatron_single_process):
    """Metrics on (no loss): every per-layer metric of GPT layer i equals hybrid layer 2i + 1's, the
    pathway (which needs the routing carry across the attention layer) included."""
    from megatron_moe_spec.core import layer_metrics
    from megatron_moe_spec.core.hybrid import hybrid_moe_layer_numbers
    from megatron_moe_spec.core.layer_specs import moe_layer_numbers

    spec = SpecializationConfig(metrics=True)
    gpt = build_gpt(SETTINGS, spec)
    layer_metrics.register_layers(moe_layer_numbers(gpt.config), SETTINGS.num_moe_experts)
    run(gpt, SETTINGS)
    gpt_report = layer_metrics.report()
    hybrid = build_hybrid(SETTINGS, spec, "*E*E")
    load_mapped(hybrid, gpt)
    layer_metrics.register_layers(hybrid_moe_layer_numbers("*E*E"), SETTINGS.num_moe_experts)
    run(hybrid, SETTINGS)
    hybrid_report = layer_metrics.report()
    per_layer = {k: v for k, v in gpt_report.items() if "/layer_" in k}
    assert "pathway_nmi/layer_0" in per_layer and "activation_similarity/layer_1" in per_layer
    for key, value in per_layer.items():
        name, i = key.split("/layer_")
        assert hybrid_report[f"{name}/layer_{2 * int(i) + 1}"] == pytest.approx(value, rel=1e-6, abs=1e-9), key


# ----------------------------------------------------------------------------- 3. R_cp across - and *
@requires_hybrid
@pytest.mark.parametrize("pattern", ["*E-*E", "*E*-E"])
def test_coupling_pairs_e_layers_across_other_layers(megatron_single_process, pattern):
    """R_cp alone on a pattern with dense and attention layers between the two E layers: logged under
    the first E layer's index, equal to an independent float64 R_cp of the two layers' routing, and its
    gradient equals that R_cp's gradient through megatron's stock HybridModel (same weights)."""
    from megatron_moe_spec.core.hybrid import hybrid_moe_layer_numbers
    from megatron_moe_spec.core.layer_specs import coupled_layers

    settings = SETTINGS.replace(**QUIET)
    coeff = 0.5
    spec = SpecializationConfig(cp_coeff=coeff)
    ours = build_hybrid(settings, spec, pattern)
    _, grads, tracker = run(ours, settings, lm_weight=0.0)

    stock = build_hybrid(settings, SpecializationConfig(), pattern)
    assert type(stock.decoder).__name__ == "LocalHybridStack"
    stock.load_state_dict(ours.state_dict())
    value, expected, _ = reference_coupling(stock, settings, coeff, spec.cp_form)

    first, second = hybrid_moe_layer_numbers(pattern)
    assert coupled_layers(ours.config, hybrid_layer_pattern=pattern) == [first - 1]  # the driver's rule
    logged = tracker["coupling_loss"]
    assert float(logged[first - 1]) == pytest.approx(float(value), rel=1e-5)
    assert float(logged.abs().sum() - logged[first - 1].abs()) == 0.0, logged  # only under the first E
    scale = max(float(g.abs().max()) for g in expected.values() if g is not None)
    assert scale > 0
    for name, g in grads.items():
        ref = expected[name] if expected[name] is not None else torch.zeros_like(g)
        tol = 1e-5 * float(ref.abs().max()) + 1e-7 * scale
        assert float((g.double() - ref.double()).abs().max()) <= tol, name
    # R_cp reaches the first E layer's router through the carry (across the layers between).
    assert float(grads[f"decoder.layers.{first - 1}.mlp.router.weight"].abs().max()) > 1e-3 * scale


# ----------------------------------------------------------------------------- recompute
RECOMPUTE = {  # name: (config changes, losses)
    "full_uniform_1": (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1), ALL_ON),
    "full_uniform_2": (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2), ALL_ON),
    "selective_moe": (dict(recompute_granularity="selective", recompute_modules=["moe"]), ALL_ON),
    # block: R_cp is refused (check_compatibility), the other losses are exact.
    "full_block_3": (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
                     dataclasses.replace(ALL_ON, cp_coeff=0.0)),
}


@requires_hybrid
@pytest.mark.parametrize("variant", sorted(RECOMPUTE))
def test_recompute_matches_no_recompute(megatron_single_process, variant):
    """``*E-*E`` with every loss on under recomputation: the same losses and gradients as without
    (block recomputation, which leaves the second E layer out of recomputation here: without R_cp)."""
    pattern = "*E-*E"
    changes, spec = RECOMPUTE[variant]
    plain = build_hybrid(SETTINGS, spec, pattern)
    lm, grads, tracker = run(plain, SETTINGS)
    recomputed = build_hybrid(SETTINGS.replace(**changes), spec, pattern)
    recomputed.load_state_dict(plain.state_dict())
    from megatron.core.transformer.moe.moe_layer import MoELayer

    calls = []
    for module in recomputed.modules():
        if isinstance(module, MoELayer):
            module.begin_step(metrics=False)  # empty R_cp's recompute queues, as the driver does per step
            module.router.register_forward_hook(lambda mod, args, out: calls.append(mod.layer_number))
    lm_r, grads_r, tracker_r = run(recomputed, SETTINGS)
    twice = [2, 2, 5] if variant == "full_block_3" else [2, 2, 5, 5]
    assert sorted(calls) == twice, calls  # the recomputed routers ran twice: recomputation is on
    assert lm_r == pytest.approx(lm, rel=1e-6)
    if spec.cp_coeff > 0:
        assert float(tracker["coupling_loss"].abs().sum()) > 0  # R_cp is there to compare
    for name in (n for n in NAMES if n in tracker):
        assert torch.allclose(tracker_r[name], tracker[name], rtol=1e-6, atol=1e-9), (name, tracker_r[name], tracker[name])
    scale = max(float(g.abs().max()) for g in grads.values())
    for name, g in grads.items():
        assert float((g - grads_r[name]).abs().max()) <= 1e-5 * float(g.abs().max()) + 1e-7 * scale, name


# ----------------------------------------------------------------------------- 4. refusals
@requires_hybrid
@pytest.mark.parametrize("symbol, module", [("M", "mamba_ssm"), ("M", "causal_conv1d"), ("G", "fla")])
def test_kernel_families_refused_without_their_kernels(monkeypatch, symbol, module):
    """Each kernel missing in turn (the others importable): one line naming the symbol, the module and
    the fix; with every kernel importable the pattern passes."""
    from megatron_moe_spec.core import hybrid

    monkeypatch.setattr(hybrid, "_importable", lambda name: not name.startswith(module))
    with pytest.raises(ValueError) as error:
        hybrid.check_hybrid_pattern(f"*E{symbol}*E")
    message = str(error.value)
    assert f"'{symbol}'" in message and module in message and "install" in message and "\n" not in message
    monkeypatch.setattr(hybrid, "_importable", lambda name: True)
    hybrid.check_hybrid_pattern(f"*E{symbol}*E")


@requires_hybrid
@pytest.mark.parametrize("pattern, words", [("*E*E/E", "MTP"), ("*E+E", "MLA"), ("*EDE", "'D' (DeepSeek"), ("*E?E", "unknown"), ("", "non-empty")])
def test_other_patterns_refused(pattern, words):
    from megatron_moe_spec.core.hybrid import check_hybrid_pattern

    with pytest.raises(ValueError, match=re.escape(words)):
        check_hybrid_pattern(pattern)


@requires_hybrid
def test_spec_refusals(megatron_single_process):
    from megatron_moe_spec.core.compatibility import hybrid_coupling_refusal
    from megatron_moe_spec.core.hybrid import get_hybrid_stack_spec

    spec = SpecializationConfig(cp_coeff=1e-3)
    config = _config(SETTINGS.replace(num_layers=4))
    with pytest.raises(ValueError, match="pipeline_model_parallel_size"):
        get_hybrid_stack_spec(dataclasses.replace(config, pipeline_model_parallel_size=2), spec, "*E|*|E",
                              use_transformer_engine=False)
    # one model chunk per segment (re.escape: the message's '|' is no regex alternation)
    with pytest.raises(ValueError, match=re.escape("'*E|*E' has 2 '|' pipeline segments")):
        get_hybrid_stack_spec(config, spec, "*E|*E", use_transformer_engine=False)
    with pytest.raises(ValueError, match="set num_layers to 5"):
        get_hybrid_stack_spec(config, spec, "*E-*E", use_transformer_engine=False)
    with pytest.raises(ValueError, match="hybrid_layer_pattern is required"):
        get_hybrid_stack_spec(config, spec, use_transformer_engine=False)
    with pytest.raises(ValueError) as error:  # R_cp with one E layer: the pattern and the fix, one line
        get_hybrid_stack_spec(config, spec, "*E*-", use_transformer_engine=False)
    assert str(error.value) == hybrid_coupling_refusal("*E*-", 1)
    assert "'*E*-' has 1 'E' (MoE) layer: put at least two 'E'" in str(error.value)
    # The local spec has no Mamba layer: 'M' would be an identity layer, refused (whatever the kernels).
    from megatron_moe_spec.core import hybrid

    with pytest.raises(ValueError, match="mamba_layer is IdentityOp"):
        hybrid._check_pattern_against(config, hybrid.local_hybrid_stack_spec(config), "*EME")
