"""Inside a real megatron-core GPT: each specialization loss's value and gradient equal an
independent computation from the layer inputs and the weights (one process, CPU backend).

The independent side recomputes routing (softmax of x W_r^T, top-k), the SwiGLU intermediates
z_e = silu(x W_gate_e) * (x W_up_e) and expert outputs y_e = z_e W_2e^T from the captured MoE-layer
inputs and the parameters, applies the pure loss functions, and differentiates with autograd through
the model's own graph. The model side is the difference of the gradients with the coefficient on and
off (everything else, LM and load-balancing loss included, cancels).
"""
import functools

import pytest
import torch

from megatron_moe_spec import losses
from megatron_moe_spec.specialization_config import SpecializationConfig
from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, build_model, build_transformer_config, global_microbatches

pytestmark = pytest.mark.timeout(300)


def independent_layer(moe, x_SBH, selection_TE=None):
    """Routing, z and y of one MoE layer from its input and weights (no megatron code).

    ``selection_TE``: the experts megatron selected (bool [T, E]); needed when the selection is not
    the top-k of p (group-limited routing, expert bias), where the spec's A_t is megatron's choice.
    """
    x = x_SBH.reshape(-1, x_SBH.shape[-1])
    logits = x @ moe.router.weight.t()
    if moe.config.moe_router_score_function == "sigmoid":
        scores = torch.sigmoid(logits.float())
        p = scores / scores.sum(-1, keepdim=True)  # spec: sigmoid scores over their sum
    else:
        p = torch.softmax(logits.float(), dim=-1)
    k = moe.config.moe_router_topk
    if selection_TE is None:
        topk_idx = torch.topk(p, k, dim=-1).indices.sort(dim=-1).values  # ascending expert order
    else:
        order = torch.argsort((~selection_TE).int() * p.shape[1] + torch.arange(p.shape[1]), dim=1)
        topk_idx = order[:, :k]
    F = moe.config.moe_ffn_hidden_size
    zs, ys = [], []
    for slot in range(k):
        z_slot, y_slot = [], []
        for t in range(x.shape[0]):
            expert = moe.experts.local_experts[int(topk_idx[t, slot])]
            w1 = expert.linear_fc1.weight
            h = x[t] @ w1.t()
            z = torch.nn.functional.silu(h[:F]) * h[F:]
            z_slot.append(z)
            y_slot.append(z @ expert.linear_fc2.weight.t())
        zs.append(torch.stack(z_slot))
        ys.append(torch.stack(y_slot))
    z_TKF = torch.stack(zs, dim=1)
    y_TKH = torch.stack(ys, dim=1)
    selected = p.gather(1, topk_idx)
    gates = torch.zeros_like(p).scatter(1, topk_idx, selected / selected.sum(1, keepdim=True))
    return {"p": p, "topk_idx": topk_idx, "z": z_TKF, "y": y_TKH, "gates": gates}


def independent_loss(kind, layers, spec, valid=None):
    """The pure loss functions on the independent tensors; ``valid``: one [T] mask per layer."""
    valid = valid or [None] * len(layers)
    if kind == "sp":
        return [losses.specialization_loss(l["z"], v, similarity=spec.sp_similarity) for l, v in zip(layers, valid)]
    if kind == "ortho":
        return [losses.orthogonality_loss(l["y"], v) for l, v in zip(layers, valid)]
    if kind == "var":
        return [losses.variance_loss(l["gates"], v, form=spec.v_form, probs=l["p"]) for l, v in zip(layers, valid)]
    if kind == "cp":
        return [losses.coupling_loss(a["p"], a["topk_idx"], b["p"], b["topk_idx"],
                                     None if va is None else va & vb, form=spec.cp_form)
                for a, b, va, vb in zip(layers[:-1], layers[1:], valid[:-1], valid[1:])]
    raise ValueError(kind)


COEFF_FIELD = {"sp": "sp_coeff", "ortho": "ortho_coeff", "var": "var_coeff", "cp": "cp_coeff"}
TRACKER_NAME = {"sp": "specialization_loss", "ortho": "orthogonality_loss", "var": "variance_loss",
                "cp": "coupling_loss"}


def run_model(settings, spec, params_from=None, padding_mask=None, expert_bias=False):
    """Forward+backward of the LM loss; returns the model, its grads and the captured MoE inputs."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    from megatron_moe_spec.core.layer_specs import get_moe_block_spec
    from megatron_moe_spec.core.moe_layer import SpecializationMoELayer

    config = build_transformer_config(settings)
    torch.manual_seed(1234)
    model = build_model(config, settings, functools.partial(get_moe_block_spec, spec_config=spec),
                        wrap_ddp=False)[0]
    if expert_bias:  # a trained-looking bias (megatron starts it at 0 and updates it between steps)
        for name, buffer in model.named_buffers():
            if name.endswith("router.expert_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    if params_from is not None:
        model.load_state_dict(params_from.state_dict())
    model.train()
    clear_aux_losses_tracker()
    inputs = {}
    moe_layers = [m for m in model.modules() if isinstance(m, SpecializationMoELayer)]
    hooks = [m.register_forward_pre_hook(functools.partial(lambda i, mod, args, kw: inputs.__setitem__(i, args[0] if args else kw["hidden_states"]), i), with_kwargs=True)
             for i, m in enumerate(moe_layers)]
    routing_maps = {}
    hooks += [m.router.register_forward_hook(functools.partial(lambda i, mod, args, out: routing_maps.__setitem__(i, out[1].detach()), i))
              for i, m in enumerate(moe_layers)]
    batch = global_microbatches(settings, 1)[0]
    extra = {} if padding_mask is None else {"padding_mask": padding_mask}
    out = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                labels=batch["labels"], **extra)
    lm = out.float().mean()
    params = [p for p in model.parameters()]
    global NAMES
    NAMES = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(lm, params, retain_graph=True, allow_unused=True)
    for h in hooks:
        h.remove()
    tracker = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
    run_model.routing_maps = routing_maps
    return model, moe_layers, grads, inputs, params, tracker


@pytest.mark.parametrize("kind", ["sp", "ortho", "var", "cp"])
def test_loss_value_and_gradient_match_independent_computation(megatron_single_process, kind):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    settings = TinyGPTSettings(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                               micro_batch_size=2, seq_length=8, moe_aux_loss_coeff=0.0)
    coeff = 0.5  # large, so the loss's gradient stands well above round-off
    spec_on = SpecializationConfig(**{COEFF_FIELD[kind]: coeff})
    spec_off = SpecializationConfig(metrics=True)  # records routing, attaches nothing
    model_on, moe_on, grads_on, _, _, tracker = run_model(settings, spec_on)
    # The independent side differentiates through the "off" model's graph: the "on" graph carries
    # megatron's aux-loss autoscalers, whose backward would inject the model's own losses.
    model_off, moe_off, grads_off, inputs, params, _ = run_model(settings, spec_off, params_from=model_on)

    layers = [independent_layer(m, inputs[i]) for i, m in enumerate(moe_off)]
    values = independent_loss(kind, layers, spec_on)
    total = sum(values)
    expected_grads = torch.autograd.grad(total, params, allow_unused=True)

    # Values: the tracker holds each layer's loss (R_cp under the earlier layer of the pair).
    logged = tracker[TRACKER_NAME[kind]]
    logged = logged[logged != 0] if kind != "var" else logged
    assert torch.allclose(logged.double(), torch.stack(values).double().detach(), rtol=1e-5, atol=1e-7), \
        (logged, values)
    # Gradients: (on - off) / coeff == d(sum of layer losses)/d(theta), for every parameter.
    checked = 0
    checked_i = -1
    for p, g_on, g_off, g_exp in zip(params, grads_on, grads_off, expected_grads):
        checked_i += 1
        diff = (g_on if g_on is not None else torch.zeros_like(p)) - (g_off if g_off is not None else torch.zeros_like(p))
        exp = coeff * (g_exp if g_exp is not None else torch.zeros_like(p))
        scale = max(float(exp.abs().max()), 1e-12)
        # Relative to the loss's own gradient, plus fp32 round-off of the two LM gradients.
        roundoff = 1e-4 * float(g_off.abs().max()) if g_off is not None else 0.0
        assert float((diff - exp).abs().max()) <= 1e-4 * scale + roundoff + 1e-10, NAMES[checked_i]
        checked += int(exp.abs().max() > 0)
    assert checked > 0


VARIANTS = {
    # name: (settings changes, padding?)
    "sigmoid_router": ({"moe_router_score_function": "sigmoid"}, False),
    "group_limited_topk": ({"extra_config": {"moe_router_num_groups": 2, "moe_router_group_topk": 1}}, False),
    "sigmoid_expert_bias": ({"moe_router_score_function": "sigmoid",
                             "extra_config": {"moe_router_enable_expert_bias": True}}, False),
    "padding_tokens": ({}, True),
    "capacity_dropping": ({"extra_config": {"moe_expert_capacity_factor": 1.0, "moe_token_drop_policy": "probs"}}, False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", ["sp", "var", "cp"])
def test_variants_match_independent_computation(megatron_single_process, variant, kind):
    """Sigmoid scores are normalized per the spec; padding and capacity-dropped tokens count for nothing."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    changes, with_padding = VARIANTS[variant]
    settings = TinyGPTSettings(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                               micro_batch_size=2, seq_length=8, moe_aux_loss_coeff=0.0).replace(**changes)
    padding = None
    if with_padding:
        padding = torch.zeros(settings.micro_batch_size, settings.seq_length, dtype=torch.bool)
        padding[0, -3:] = True
        padding[1, -5:] = True
    coeff = 0.5
    spec_on = SpecializationConfig(**{COEFF_FIELD[kind]: coeff})
    model_on, _, grads_on, _, _, tracker = run_model(settings, spec_on, padding_mask=padding,
                                                     expert_bias=(variant == "sigmoid_expert_bias"))
    model_off, moe_off, grads_off, inputs, params, _ = run_model(
        settings, SpecializationConfig(metrics=True), params_from=model_on, padding_mask=padding)
    maps = run_model.routing_maps

    from_megatron = variant in ("group_limited_topk", "sigmoid_expert_bias")
    layers = [independent_layer(m, inputs[i], maps[i] if from_megatron else None) for i, m in enumerate(moe_off)]
    if from_megatron:
        # The selection really differs from the plain top-k of p (else the variant tests nothing).
        plain = [torch.zeros_like(maps[i]).scatter(1, torch.topk(l["p"], 2).indices, True) for i, l in enumerate(layers)]
        assert any(not torch.equal(a, maps[i]) for i, a in enumerate(plain))
    valid = []
    for i, layer in enumerate(layers):
        v = maps[i].sum(1) == settings.moe_router_topk  # capacity: only tokens that kept all k experts
        if padding is not None:
            v = v & ~padding.t().reshape(-1)  # MoE tokens are [S, B] flattened
        valid.append(v)
    if variant == "capacity_dropping":
        assert any(not bool(v.all()) for v in valid), "the capacity factor dropped nothing"
        # Valid tokens' experts are megatron's routing.
        for layer, m, v in zip(layers, maps.values(), valid):
            chosen = torch.zeros_like(m).scatter(1, layer["topk_idx"], True)
            assert torch.equal(chosen[v], m[v])
    values = independent_loss(kind, layers, spec_on, valid)
    expected_grads = torch.autograd.grad(sum(values), params, allow_unused=True)
    logged = tracker[TRACKER_NAME[kind]]
    logged = logged[: len(values)] if kind == "cp" else logged
    assert torch.allclose(logged.double(), torch.stack(values).double().detach(), rtol=1e-5, atol=1e-7), (logged, values)
    for p, g_on, g_off, g_exp in zip(params, grads_on, grads_off, expected_grads):
        diff = (g_on if g_on is not None else torch.zeros_like(p)) - (g_off if g_off is not None else torch.zeros_like(p))
        exp = coeff * (g_exp if g_exp is not None else torch.zeros_like(p))
        roundoff = 1e-4 * float(g_off.abs().max()) if g_off is not None else 0.0
        assert float((diff - exp).abs().max()) <= 1e-4 * float(exp.abs().max()) + roundoff + 1e-10


def test_metrics_on_with_zero_coefficients_leaves_gradients_bit_identical(megatron_single_process):
    settings = TinyGPTSettings(num_moe_experts=4, moe_ffn_hidden_size=32, micro_batch_size=2, seq_length=8)
    stock, _, grads_stock, _, _, _ = run_model(settings, SpecializationConfig())
    _, _, grads_metrics, _, _, _ = run_model(settings, SpecializationConfig(metrics=True), params_from=stock)
    for a, b in zip(grads_stock, grads_metrics):
        assert (a is None and b is None) or torch.equal(a, b)


def test_everything_off_is_megatrons_own_spec(megatron_single_process):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_moe_spec.core.layer_specs import get_moe_block_spec

    config = build_transformer_config(TinyGPTSettings())
    ours = get_moe_block_spec(config, SpecializationConfig(), use_transformer_engine=False)
    stock = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    from megatron_moe_spec.testing.compare import spec_structure  # MoE specs are partials from 0.18

    assert spec_structure(ours) == spec_structure(stock)
    assert [s.module for s in ours.layer_specs] == [s.module for s in stock.layer_specs]


def test_top1_routing_gives_zero_pairwise_losses(megatron_single_process):
    settings = TinyGPTSettings(num_moe_experts=4, moe_router_topk=1, moe_ffn_hidden_size=32,
                               micro_batch_size=2, seq_length=8,
                               extra_config={"moe_router_pre_softmax": True})  # megatron's rule for k = 1
    _, _, grads, _, _, tracker = run_model(settings, SpecializationConfig(sp_coeff=0.5, ortho_coeff=0.5, var_coeff=0.1))
    assert "specialization_loss" not in tracker or float(tracker["specialization_loss"].abs().sum()) == 0.0
    assert float(tracker["variance_loss"].abs().sum()) > 0  # L_v is defined for k = 1


def test_cross_stage_coupling_pairs_are_named_in_a_startup_warning(megatron_single_process, caplog):
    """R_cp pairs split across pipeline stages / chunks are left out, never silently (spec section 2)."""
    import dataclasses
    import logging

    from megatron_moe_spec.core.layer_specs import check_compatibility, cross_stage_pairs, moe_layer_numbers

    config = build_transformer_config(TinyGPTSettings(num_layers=4))
    pp2 = dataclasses.replace(config, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    pp2_vpp2 = dataclasses.replace(pp2, virtual_pipeline_model_parallel_size=2)
    assert cross_stage_pairs(config, moe_layer_numbers(config)) == []
    assert cross_stage_pairs(pp2, moe_layer_numbers(pp2)) == [(2, 3)]
    assert cross_stage_pairs(pp2_vpp2, moe_layer_numbers(pp2_vpp2)) == [(1, 2), (2, 3), (3, 4)]
    with caplog.at_level(logging.WARNING, logger="megatron_moe_spec.core.layer_specs"):
        check_compatibility(pp2, SpecializationConfig(cp_coeff=1e-3))
    assert "(2, 3)" in caplog.text and "left out of R_cp" in caplog.text


def test_impossible_combinations_are_refused_with_the_fix(megatron_single_process):
    import dataclasses

    from megatron_moe_spec.core.layer_specs import check_compatibility

    config = build_transformer_config(TinyGPTSettings(num_layers=4))
    cases = [
        (dataclasses.replace(config, gated_linear_unit=False), SpecializationConfig(sp_coeff=1e-3), "gated_linear_unit"),
        (dataclasses.replace(config, moe_token_dispatcher_type="flex"), SpecializationConfig(sp_coeff=1e-3), "alltoall"),
        (dataclasses.replace(config, moe_layer_freq=[1, 0, 0, 0]), SpecializationConfig(cp_coeff=1e-3), "cp_coeff to 0"),
        (dataclasses.replace(config, recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
         SpecializationConfig(cp_coeff=1e-3), "recompute_method to uniform"),
    ]
    for bad_config, spec, fix in cases:
        with pytest.raises(ValueError, match=fix):
            check_compatibility(bad_config, spec)
