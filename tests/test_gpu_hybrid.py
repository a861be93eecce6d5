"""GPU checks of the losses on megatron-core's HybridModel (core.hybrid), marker ``gpu``; run by
scripts/gpu_check.sh (docs/gpu.md). NOT YET RUN ON A GPU: written and skip-checked on CPU only.

- R_cp across a layer family that needs CUDA kernels: on ``*EME`` (Mamba) and ``*EGE`` (gated delta
  net; ``D``, DeepSeek sparse attention, is refused by check_hybrid_pattern until a test builds it), built from megatron's Transformer Engine
  ``hybrid_stack_spec`` through ``get_hybrid_stack_spec``, the R_cp logged for the two ``E`` layers
  equals an independent float64 R_cp of the two layers' captured router inputs and router weights
  (megatron's stock HybridModel with the same weights), and the gradient of R_cp alone (LM weight 0)
  equals that reference's autograd gradient relative to each parameter's own gradient. The carry
  crosses the middle layer only through ``SpecializationHybridStack``'s hooks: without them R_cp is
  not computed at all.
- GPT == ``*E*E`` on CUDA: the main test of tests/test_hybrid.py (LM loss, R_sp, R_cp, L_o, L_v per
  layer, gradients) with Transformer Engine (TEGroupedMLP experts) and with megatron's local modules,
  and R_sp, L_o, L_v each alone (LM weight 0) relative to that loss's own gradient.

Skipped, each with its reason: without CUDA; on megatron-core < 0.19 (no HybridModel;
scripts/gpu_check.sh installs 0.16.1 unless ``MMS_MEGATRON_CORE=0.19.2``); without Transformer
Engine (megatron's hybrid_stack_spec imports it); a family whose kernels do not import (the reason
names the module, core.hybrid.check_hybrid_pattern's message).

Tolerances: the two runs compared execute the same CUDA kernels on the same inputs, but some backward
kernels (atomics in Mamba's and TE's reductions) are not bitwise deterministic: values to relative
1e-5 (1e-4 for R_cp against the float64 reference), gradients to 1e-4 of each parameter's own
gradient plus 1e-6 of the largest.
"""
import pytest
import torch

from megatron_moe_spec.core.layer_specs import have_transformer_engine
from megatron_moe_spec.core.version import megatron_core_version
from megatron_moe_spec.specialization_config import SpecializationConfig
from megatron_moe_spec.testing.hybrid import (
    ALL_ON, COEFF_FIELD, NAMES, QUIET, assert_grads_match, fresh_tracker, load_mapped, reference_coupling,
    run_step)
from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, build_transformer_config
from test_gpu import NO_CUDA, NO_TE, megatron_world

CUDA = torch.cuda.is_available()
HAVE_HYBRID = megatron_core_version().release[:2] >= (0, 19)
TE = CUDA and have_transformer_engine()
NO_HYBRID = (f"HybridModel (megatron.core.models.hybrid) is megatron-core >= 0.19 only; installed "
             f"{megatron_core_version()} (scripts/gpu_check.sh: set MMS_MEGATRON_CORE=0.19.2)")
NO_TE_HYBRID = NO_TE.replace("TEGroupedMLP cannot be built",
                             "megatron's hybrid_stack_spec (TE layers, TEGroupedMLP) cannot be built")


def _unavailable(needs_te: bool):
    """Why this machine cannot run the test (None: it can); CUDA first, then the version, then TE."""
    if not CUDA:
        return NO_CUDA
    if not HAVE_HYBRID:
        return NO_HYBRID
    if needs_te and not TE:
        return NO_TE_HYBRID
    return None


def _gpu(needs_te: bool):
    reason = _unavailable(needs_te)
    return [pytest.mark.gpu, pytest.mark.skipif(reason is not None, reason=reason or "")]


pytestmark = pytest.mark.timeout(600)

SETTINGS = TinyGPTSettings(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=64,
                           num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                           micro_batch_size=2, seq_length=64, vocab_size=128)
BACKEND = {  # TransformerConfig fields of each backend on CUDA
    "te": dict(transformer_impl="transformer_engine", moe_grouped_gemm=True, use_cpu_initialization=False),
    "local": dict(transformer_impl="local", moe_grouped_gemm=False, use_cpu_initialization=False),
}
# Small sizes of each kernel family (megatron's defaults are paper-sized): Mamba d_inner = 2 * 64,
# 8 heads of 16 in 2 groups; gated delta net 2 key heads and 4 value heads of 16.
FAMILY = {
    "M": dict(mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2),
    "G": dict(linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
              linear_num_key_heads=2, linear_num_value_heads=4),
}
RTOL_GRAD, ATOL_OF_SCALE = 1e-4, 1e-6
DEVICE = "cuda"


def _config(settings, backend, **extra):
    return build_transformer_config(settings.replace(extra_config=dict(BACKEND[backend], **extra)))


def build_hybrid(settings, spec, pattern, backend, **extra):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megatron_moe_spec.core.hybrid import get_hybrid_stack_spec, hybrid_layer_count

    fresh_tracker()
    config = _config(settings.replace(num_layers=hybrid_layer_count(pattern)), backend, **extra)
    torch.manual_seed(4321)
    stack = get_hybrid_stack_spec(config, spec, hybrid_layer_pattern=pattern,
                                  use_transformer_engine=backend == "te")
    model = HybridModel(config=config, hybrid_stack_spec=stack, vocab_size=settings.vocab_size,
                        max_sequence_length=settings.seq_length, hybrid_layer_pattern=pattern,
                        share_embeddings_and_output_weights=False, position_embedding_type="rope")
    return model.to(DEVICE)


def build_gpt(settings, spec, backend):
    from megatron.core.models.gpt import GPTModel

    from megatron_moe_spec.core.layer_specs import get_moe_block_spec

    fresh_tracker()
    config = _config(settings, backend)
    torch.manual_seed(1234)
    layer_spec = get_moe_block_spec(config, spec, use_transformer_engine=backend == "te")
    model = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=settings.vocab_size,
                     max_sequence_length=settings.seq_length, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope")
    return model.to(DEVICE)


# ============================================================================ R_cp across M / G / D
@pytest.mark.parametrize("symbol", [pytest.param(s, marks=_gpu(needs_te=True), id=f"*E{s}E") for s in "MG"])
def test_coupling_across_a_kernel_family_equals_independent_reference(symbol):
    """``*E{symbol}E`` on megatron's TE hybrid spec, R_cp alone: the value logged under the first E
    layer equals the float64 R_cp of the two E layers' captured router inputs and weights, and the
    gradient equals that reference's autograd gradient (through the stock model: the same kernels)."""
    from megatron_moe_spec.core.hybrid import check_hybrid_pattern

    pattern = f"*E{symbol}E"
    try:
        check_hybrid_pattern(pattern)
    except ValueError as error:  # names the module that does not import
        pytest.skip(str(error))
    check_coupling(pattern, "te", **FAMILY[symbol])


def check_coupling(pattern, backend, **extra):
    """R_cp alone on ``pattern``: logged value and gradient against the float64 reference."""
    from megatron.core.models.hybrid.hybrid_block import HybridStack

    from megatron_moe_spec.core.hybrid import hybrid_moe_layer_numbers

    symbol = pattern[2]
    settings = SETTINGS.replace(**QUIET)
    coeff = 0.5
    spec = SpecializationConfig(cp_coeff=coeff)
    with megatron_world(DEVICE):
        ours = build_hybrid(settings, spec, pattern, backend, **extra)
        assert type(ours.decoder).__name__ == "SpecializationHybridStack"
        _, grads, tracker = run_step(ours, settings, lm_weight=0.0, device=DEVICE)

        stock = build_hybrid(settings, SpecializationConfig(), pattern, backend, **extra)
        if backend == "te":
            assert type(stock.decoder) is HybridStack  # megatron's own spec, unchanged
        stock.load_state_dict(ours.state_dict())
        value, expected, moe_layers = reference_coupling(stock, settings, coeff, spec.cp_form, device=DEVICE)
        if backend == "te":
            assert [type(m.experts).__name__ for m in moe_layers] == ["TEGroupedMLP"] * 2

    first, second = hybrid_moe_layer_numbers(pattern)
    logged = tracker["coupling_loss"].double().cpu()
    assert float(logged[first - 1]) == pytest.approx(float(value.detach()), rel=1e-4)
    assert float(logged.abs().sum() - logged[first - 1].abs()) == 0.0, logged  # only under the first E
    scale = max(float(g.abs().max()) for g in expected.values() if g is not None)
    assert scale > 0
    problems = []
    for name, g in grads.items():
        ref = expected[name] if expected[name] is not None else torch.zeros_like(g)
        tol = RTOL_GRAD * float(ref.abs().max()) + ATOL_OF_SCALE * scale
        err = float((g.double() - ref.double()).abs().max())
        if err > tol:
            problems.append(f"{name}: max|err| {err:.3e} > {tol:.3e}")
    assert not problems, "R_cp gradients differ:\n  " + "\n  ".join(problems)
    # R_cp reaches the first E layer's router through the carry, and the middle layer through the
    # second E layer's input: both gradients were there to compare.
    assert float(grads[f"decoder.layers.{first - 1}.mlp.router.weight"].abs().max()) > 1e-3 * scale
    middle = [n for n, g in expected.items() if n.startswith(f"decoder.layers.{first}.") and g is not None
              and float(g.abs().max()) > 0]
    assert middle, f"no R_cp gradient reaches the '{symbol}' layer"


# ============================================================================ GPT == *E*E on CUDA
BACKENDS = [pytest.param("te", marks=_gpu(needs_te=True), id="te"),
            pytest.param("local", marks=_gpu(needs_te=False), id="local")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt_and_its_hybrid_equivalent_match_on_cuda(backend):
    """Every loss on, LM loss and load balancing too: identical LM loss, identical R_sp, R_cp, L_o, L_v
    per layer (GPT layer i's under hybrid index 2i + 1), identical gradients."""
    with megatron_world(DEVICE):
        gpt = build_gpt(SETTINGS, ALL_ON, backend)
        gpt_lm, gpt_grads, gpt_tracker = run_step(gpt, SETTINGS, device=DEVICE)
        hybrid = build_hybrid(SETTINGS, ALL_ON, "*E" * SETTINGS.num_layers, backend)
        load_mapped(hybrid, gpt)
        hy_lm, hy_grads, hy_tracker = run_step(hybrid, SETTINGS, device=DEVICE)
    assert gpt_lm == pytest.approx(hy_lm, rel=1e-5, abs=0)
    for name in NAMES:
        g, h = gpt_tracker[name].double().cpu(), hy_tracker[name].double().cpu()
        assert len(h) == 2 * len(g)
        assert bool((g != 0).any()), name
        assert torch.allclose(h[1::2], g, rtol=1e-5, atol=1e-9), (name, g, h)
        assert float(h[0::2].abs().sum()) == 0.0, (name, h)  # attention layers log nothing
    assert_grads_match(gpt_grads, hy_grads, RTOL_GRAD, f"all losses + LM ({backend})", ATOL_OF_SCALE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(set(COEFF_FIELD) - {"coupling_loss"}))  # R_cp: check_coupling
def test_each_loss_alone_matches_gpt_on_cuda(backend, name):
    """R_sp, L_o or L_v alone, LM weight 0, no load balancing: the hybrid model's gradient equals
    GPT's relative to each parameter's own gradient of that loss, and it reaches routers and experts."""
    spec = SpecializationConfig(**{COEFF_FIELD[name]: 0.5})
    settings = SETTINGS.replace(**QUIET)
    with megatron_world(DEVICE):
        gpt = build_gpt(settings, spec, backend)
        _, gpt_grads, gpt_tracker = run_step(gpt, settings, lm_weight=0.0, device=DEVICE)
        hybrid = build_hybrid(settings, spec, "*E" * settings.num_layers, backend)
        load_mapped(hybrid, gpt)
        _, hy_grads, hy_tracker = run_step(hybrid, settings, lm_weight=0.0, device=DEVICE)
    g, h = gpt_tracker[name].double().cpu(), hy_tracker[name].double().cpu()
    assert torch.allclose(h[1::2], g, rtol=1e-5, atol=1e-9), (name, g, h)
    assert_grads_match(gpt_grads, hy_grads, RTOL_GRAD, f"{name} ({backend})", ATOL_OF_SCALE)
    routers = [n for n, v in gpt_grads.items() if "router" in n and float(v.abs().max()) > 0]
    experts = [n for n, v in gpt_grads.items() if "experts" in n and float(v.abs().max()) > 0]
    assert routers and experts, (name, routers, experts)


@pytest.mark.parametrize("cuda, hybrid, te, needs_te, words", [
    (False, True, True, True, "no CUDA device"),
    (True, False, True, True, "megatron-core >= 0.19 only"),
    (True, True, False, True, "megatron's hybrid_stack_spec"),
    (True, True, False, False, None),
    (True, True, True, True, None),
])
def test_skip_reasons_name_what_is_missing(monkeypatch, cuda, hybrid, te, needs_te, words):
    """Runs everywhere: CUDA first, then the megatron-core version (with the gpu_check.sh setting that
    installs 0.19.2), then Transformer Engine; None where the test can run."""
    import sys

    module = sys.modules[__name__]
    for name, value in (("CUDA", cuda), ("HAVE_HYBRID", hybrid), ("TE", te)):
        monkeypatch.setattr(module, name, value)
    reason = _unavailable(needs_te)
    if words is None:
        assert reason is None
    else:
        assert words in reason, reason
    if not hybrid and cuda:
        assert "MMS_MEGATRON_CORE=0.19.2" in reason and str(megatron_core_version()) in reason
