"""Exact or refused (docs/compatibility.md): the table covers the installed megatron-core, the doc is the
table, and every refusal is raised, with its one-line message, exactly when it should be."""
import dataclasses
import pathlib
import types

import pytest
from packaging.version import Version

from megatron_moe_spec.core import compatibility
from megatron_moe_spec.core.compatibility import EXACT, FIELD_FILTER, NO_INTERACTION, OPTIONS, REFUSED
from megatron_moe_spec.core.layer_specs import get_moe_block_spec
from megatron_moe_spec.core.version import megatron_core_version
from megatron_moe_spec.specialization_config import SpecializationConfig as SC

ROOT = pathlib.Path(__file__).resolve().parents[1]


def config_fields():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return {f.name for f in dataclasses.fields(TransformerConfig)}


def test_every_moe_recompute_precision_cp_mtp_overlap_field_is_classified():
    """A new megatron-core flag in these areas fails here until it has a row (exact/refused/no interaction)."""
    unclassified = sorted(n for n in config_fields() if FIELD_FILTER.search(n) and n not in OPTIONS)
    assert not unclassified, f"add a row to compatibility.OPTIONS for: {', '.join(unclassified)}"


def test_rows_name_fields_of_their_versions():
    """No row for a misspelled field: on a tested end (0.16, 0.19) the rows of that end exist, the
    others don't."""
    release = "{}.{}".format(*megatron_core_version().release[:2])
    if release not in ("0.16", "0.19"):
        pytest.skip(f"the rows' versions name the tested ends 0.16 and 0.19, not {release}")
    fields = config_fields()
    for name, opt in OPTIONS.items():
        assert (name in fields) == (release in opt.versions.split()), (name, opt.versions)


def test_rows_are_well_formed():
    for name, opt in OPTIONS.items():
        assert opt.status in (EXACT, REFUSED, NO_INTERACTION), name
        assert opt.detail, name
        if opt.status == REFUSED:
            assert opt.message, f"{name}: a refused row needs its message"
        if opt.message:
            assert "\n" not in opt.message, name
            assert name in opt.message, f"{name}: the message must name the option"
            assert " set " in opt.message or " remove " in opt.message, f"{name}: the message must give the fix"


def test_doc_is_the_table():
    doc = (ROOT / "docs" / "compatibility.md").read_text()
    assert doc == compatibility.markdown(), (
        "docs/compatibility.md is out of date: python -m megatron_moe_spec.core.compatibility > "
        "docs/compatibility.md")


def test_named_tests_exist():
    """Every ``tests/<file>.py::<test>`` an exact row names (and the test_* names after it in the same
    clause) is defined in that file. Files not in this checkout are skipped (on this branch, before the
    lead's merge: tests/test_core_options.py and tests/test_cp_pipeline.py from main)."""
    import re

    checked = 0
    for name, opt in OPTIONS.items():
        for clause in opt.detail.split(";"):
            refs = list(re.finditer(r"(tests/test_\w+\.py)", clause))
            for ref, after in zip(refs, refs[1:] + [None]):
                segment = clause[ref.end():after.start() if after else len(clause)]
                if not segment.startswith("::") or not (ROOT / ref.group(1)).exists():
                    continue
                source = (ROOT / ref.group(1)).read_text()
                for test in re.findall(r"\b(test_\w+)\b", segment):
                    assert f"def {test}(" in source, f"{name}: {ref.group(1)} has no {test}"
                    checked += 1
    assert checked >= 10


# ----------------------------------------------------------------------------- refusals
ANY = [SC(var_coeff=0.1), SC(cp_coeff=0.1), SC(metrics=True)]
"""Refused with any loss or the metrics on (R_cp / L_v alone too)."""
Z = [SC(sp_coeff=0.1), SC(ortho_coeff=0.1), SC(metrics=True)]
"""Refused when fc2's input is captured: R_sp, L_o, the metrics."""

_ANY_FLAGS = ["fp8", "fp4", "quant_recipe", "activation_func_fp8_input_store",
              "moe_router_padding_for_quantization", "moe_router_padding_for_fp8",
              "overlap_moe_expert_parallel_comm", "overlap_dispatch_backward_with_experts_wgrad",
              "delay_wgrad_compute", "use_transformer_engine_op_fuser", "moe_use_grouped_tensor",
              "moe_single_grouped_weight", "moe_single_grouped_bias", "moe_paged_stash", "moe_router_fusion",
              "moe_router_force_load_balancing", "moe_enable_routing_replay", "moe_enable_deepep",
              "hybrid_context_parallel", "cpu_offloading", "fine_grained_activation_offloading",
              "enable_cuda_graph", "external_cuda_graph"]
_ANY_VALUES = {"fp8": "hybrid", "fp4": "nvfp4", "quant_recipe": object()}

# option -> [(overrides, refused spec configs, allowed spec configs, megatron-core version or None)]
CASES = {
    **{name: [({name: _ANY_VALUES.get(name, True)}, ANY, [], None)] for name in _ANY_FLAGS},
    "moe_router_force_biased": [({"moe_router_force_biased": 0.1}, ANY, [], None)],
    "moe_pad_expert_input_to_capacity": [
        ({"moe_pad_expert_input_to_capacity": True, "moe_expert_capacity_factor": 1.0, "moe_token_dispatcher_type": d},
         ANY + Z, [], None) for d in ("alltoall", "allgather")],
    "mtp_num_layers": [({"mtp_num_layers": 1}, ANY, [], None)],
    "cuda_graph_impl": [({"cuda_graph_impl": "local"}, ANY, [], None)],
    "context_parallel_size": [({"context_parallel_size": 2}, ANY + Z, [], None)],
    "expert_gtp_weight_remat_size": [({"expert_gtp_weight_remat_size": 2}, ANY, [], None)],
    "moe_token_dispatcher_type": [({"moe_token_dispatcher_type": "flex"}, ANY + Z, [], None)],
    "moe_router_score_function": [({"moe_router_score_function": "sqrtsoftplus"}, ANY, [], None)],
    "moe_router_load_balancing_type": [({"moe_router_load_balancing_type": t}, ANY, [], None)
                                       for t in ("sinkhorn", "quantile_balancing", ["aux_loss", "sinkhorn"])],
    "num_moe_experts": [({"num_moe_experts": None}, ANY, [], None)],
    "gated_linear_unit": [({"gated_linear_unit": False}, [SC(sp_coeff=0.1)],
                           [SC(ortho_coeff=0.1), SC(var_coeff=0.1), SC(metrics=True)], None)],
    "moe_use_legacy_grouped_gemm": [({"moe_grouped_gemm": True, "moe_use_legacy_grouped_gemm": True}, Z,
                                     [SC(var_coeff=0.1), SC(cp_coeff=0.1)], None)],
    "moe_apply_probs_on_input": [({"moe_apply_probs_on_input": True}, Z, [SC(var_coeff=0.1)], None)],
    "moe_latent_size": [({"moe_latent_size": 16}, Z, [SC(var_coeff=0.1)], None)],
    "moe_permute_fusion": [({"moe_permute_fusion": True}, Z, [SC(var_coeff=0.1), SC(cp_coeff=0.1)], None)],
    "recompute_modules": [({"recompute_granularity": "selective", "recompute_modules": ["core_attn", "moe_act"]},
                           Z, [SC(var_coeff=0.1), SC(cp_coeff=0.1)], None)],
    "moe_shared_expert_overlap": [
        ({"moe_shared_expert_overlap": True, "moe_shared_expert_intermediate_size": 64}, Z,
         [SC(var_coeff=0.1), SC(cp_coeff=0.1)], "0.18.0"),
        ({"moe_shared_expert_overlap": True, "moe_shared_expert_intermediate_size": 64}, Z, [], "0.19.2"),
        # before 0.18 token_combine has no shared-expert side effect: not refused
        ({"moe_shared_expert_overlap": True, "moe_shared_expert_intermediate_size": 64}, [], Z, "0.17.1"),
    ],
    "moe_layer_freq": [({"moe_layer_freq": [1, 0, 0, 0]}, [SC(cp_coeff=0.1)],
                        [SC(sp_coeff=0.1), SC(var_coeff=0.1), SC(metrics=True)], None)],
    "recompute_method": [({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
                          [SC(cp_coeff=0.1)], [SC(sp_coeff=0.1), SC(var_coeff=0.1)], None)],
}
ALL_OFF = SC()


@pytest.fixture(scope="module")
def base_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_moe_experts=4,
                             moe_router_topk=2, moe_ffn_hidden_size=32, gated_linear_unit=True,
                             moe_token_dispatcher_type="alltoall")


def with_options(config, overrides):
    """``config`` as a plain object with ``overrides`` set: many of these options cannot be built on
    CPU (TransformerConfig's own checks need TE / CUDA) or do not exist on this version."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    values.update(overrides)
    return types.SimpleNamespace(**values)


def test_every_refusal_has_a_test():
    refusable = {name for name, opt in OPTIONS.items() if opt.message}
    assert refusable == set(CASES), (sorted(refusable - set(CASES)), sorted(set(CASES) - refusable))


def _cases():
    for option, variants in CASES.items():
        for i, variant in enumerate(variants):
            yield pytest.param(option, *variant, id=f"{option}-{i}")


@pytest.mark.parametrize("option,overrides,refused,allowed,version", list(_cases()))
def test_refusal_names_the_option_and_the_fix(monkeypatch, base_config, option, overrides, refused, allowed,
                                              version):
    """Building the spec with the option set raises the row's one-line message for each refused
    combination, and refuses nothing when everything is off (off means stock megatron-core)."""
    if version is not None:
        monkeypatch.setattr("megatron_moe_spec.core.version.megatron_core_version", lambda: Version(version))
    config = with_options(base_config, overrides)
    for spec in refused:
        with pytest.raises(ValueError) as info:
            get_moe_block_spec(config, spec)
        assert str(info.value) == OPTIONS[option].message, (spec, str(info.value))
    for spec in allowed + [ALL_OFF]:
        compatibility.check_compatibility(config, spec)


@pytest.mark.parametrize("pattern, count", [("*E*-", 1), ("*E-*", 1), ("*-*-", 0)])
def test_coupling_on_a_hybrid_pattern_with_fewer_than_two_e_layers_names_the_pattern(base_config, pattern, count):
    """R_cp on a HybridModel pattern with fewer than two 'E': one line naming the pattern and the fix
    (at least two 'E'), not the GPT message's num_layers / moe_layer_freq; the other losses pass, and
    two 'E' pass."""
    config = with_options(base_config, {})  # moe_layer_freq 1: the GPT rule alone would see 4 MoE layers
    with pytest.raises(ValueError) as info:
        compatibility.check_compatibility(config, SC(cp_coeff=0.1), hybrid_layer_pattern=pattern)
    message = str(info.value)
    assert message == compatibility.hybrid_coupling_refusal(pattern, count)
    assert repr(pattern) in message and "at least two 'E'" in message and "cp_coeff to 0" in message
    assert "moe_layer_freq" not in message and "\n" not in message
    compatibility.check_compatibility(config, SC(sp_coeff=0.1, var_coeff=0.1), hybrid_layer_pattern=pattern)
    compatibility.check_compatibility(config, SC(cp_coeff=0.1), hybrid_layer_pattern="*E-E")


def test_off_builds_megatrons_own_spec_with_refused_options_set(megatron_single_process):
    """Every coefficient 0 and metrics off: the options refused with the losses still build stock specs."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_moe_experts=4,
                               moe_router_topk=2, moe_ffn_hidden_size=32, gated_linear_unit=True,
                               moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True,
                               recompute_granularity="selective", recompute_modules=["moe_act"],
                               moe_grouped_gemm=True)
    ours = get_moe_block_spec(config, ALL_OFF, use_transformer_engine=False)
    stock = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    assert [s.module for s in ours.layer_specs] == [s.module for s in stock.layer_specs]
    with pytest.raises(ValueError, match="moe_pad_expert_input_to_capacity"):
        get_moe_block_spec(config, SC(var_coeff=0.1), use_transformer_engine=False)


# ----------------------------------------------------------------------------- exact rows tested here
@pytest.mark.multirank
@pytest.mark.timeout(900)
def test_shared_expert_overlap_before_0_18_matches_one_process_without_it():
    """``moe_shared_expert_overlap`` (alltoall, EP2, all losses and metrics) on megatron-core < 0.18:
    one step equals one process without the overlap (losses, tracker, gradients, rtol 1e-5)."""
    import functools

    from megatron_moe_spec.testing.compare import assert_same_step
    from megatron_moe_spec.testing.distributed import ParallelSizes, run_distributed
    from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, train_step_result

    if megatron_core_version().release[:2] >= (0, 18):
        pytest.skip("refused from megatron-core 0.18 (test_refusal_names_the_option_and_the_fix)")
    spec = SC(sp_coeff=0.05, cp_coeff=0.05, ortho_coeff=0.05, var_coeff=0.05, metrics=True)
    spec_fn = functools.partial(get_moe_block_spec, spec_config=spec)
    settings = TinyGPTSettings(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
                               moe_shared_expert_intermediate_size=32, moe_token_dispatcher_type="alltoall")
    single = settings.replace(num_microbatches=2)  # the micro-batches of both DP ranks, no overlap
    ref = run_distributed(train_step_result, 1, ParallelSizes(), args=(single, spec_fn))[0]
    results = run_distributed(train_step_result, 2, ParallelSizes(ep=2),
                              args=(settings.replace(moe_shared_expert_overlap=True), spec_fn),
                              kwargs={"initial_params": ref["params"]})
    for name in ("specialization_loss", "coupling_loss", "orthogonality_loss", "variance_loss"):
        assert any(v != 0 for v in ref["tracker"][name]), f"{name} was not logged"
    for rank, result in enumerate(results):
        assert_same_step(ref, result, rtol=1e-5)
        for name, values in ref["tracker"].items():
            for layer, (a, b) in enumerate(zip(values, result["tracker"][name])):
                assert abs(a - b) <= 1e-5 * max(abs(a), 1e-6), f"rank {rank} {name} layer {layer}: {b} != {a}"
