"""Inside a real megatron-core GPT: each specialization loss's value and gradient equal an
independent computation from the layer inputs and the weights (one process, CPU backend).

Each loss is switched on alone, with the LM loss weighted 0 and megatron's load balancing off, so the
model's gradient is that loss's gradient and nothing else. The independent side is megatron's stock
model (every coefficient 0: megatron's own spec) with the same weights: from the captured MoE-layer
inputs and the parameters it recomputes routing (softmax of x W_r^T, top-k), the SwiGLU intermediates
z_e = silu(x W_gate_e) * (x W_up_e) and the expert outputs y_e = z_e W_2e^T, evaluates the spec's
formulas written out below (float64, no code of megatron_moe_spec.losses) and differentiates with
autograd through the stock model's graph. Every parameter's gradient must agree to 1e-5 of that
parameter's own reference gradient (+ 1e-7 of the loss's largest: fp32 round-off); a parameter the
loss cannot reach must get at most 1e-6 of the loss's largest gradient.
"""
import functools
import logging

import pytest
import torch

from megatron_moe_spec.specialization_config import SpecializationConfig
from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, build_model, build_transformer_config, global_microbatches

pytestmark = pytest.mark.timeout(300)

# Tolerances of the gradient checks, all relative to the loss's own gradient (see the module docstring).
RTOL = 1e-5
"""Of each parameter's own reference gradient."""
FLOOR = 1e-7
"""Of the loss's largest gradient, added to RTOL: the fp32 round-off of the chain that carries a
small gradient (e.g. 2.6e-9 on a router whose own gradient is 2.6e-4 under a loss whose largest is 0.22)."""
UNREACHED_RTOL = 1e-6
"""Of the loss's largest gradient: the most a parameter the loss cannot reach may get."""


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
    if moe.config.moe_router_pre_softmax:  # gates: softmax over all experts, then top-k (k = 1)
        gates = torch.zeros_like(p).scatter(1, topk_idx, selected)
    else:  # softmax over the top-k logits: the selected p renormalized
        gates = torch.zeros_like(p).scatter(1, topk_idx, selected / selected.sum(1, keepdim=True))
    return {"p": p, "topk_idx": topk_idx, "z": z_TKF, "y": y_TKH, "gates": gates}


# ----------------------------------------------------------------------------- the spec, written out
def _mean_over(values_T, valid_T):
    """Mean over the valid tokens (all when ``valid_T`` is None); 0 when there is none."""
    if valid_T is None:
        return values_T.mean()
    kept = torch.where(valid_T, values_T, torch.zeros_like(values_T))
    return kept.sum() / max(int(valid_T.sum()), 1)


def _cos(a, b, eps):
    return (a * b).sum(-1) / (a.norm(dim=-1).clamp_min(eps) * b.norm(dim=-1).clamp_min(eps))


def spec_specialization(z_TKF, valid_T, similarity, eps):
    """docs/spec.md section 1: mean over tokens of the mean over expert pairs of cos^2 (or |cos|)."""
    z = z_TKF.double()
    k = z.shape[1]
    pairs = [(e, v) for e in range(k) for v in range(e + 1, k)]
    if not pairs:
        return z.sum() * 0.0
    sims = [_cos(z[:, e], z[:, v], eps) for e, v in pairs]
    per_token = sum(c.square() if similarity == "squared_cosine" else c.abs() for c in sims) / len(pairs)
    return _mean_over(per_token, valid_T)


def spec_orthogonality(y_TKH, valid_T, eps):
    """Section 3: (1/k) sum_{j != m} || (<y_j, y_m> / (<y_m, y_m> + eps)) y_m ||^2, mean over tokens."""
    y = y_TKH.double()
    k = y.shape[1]
    per_token = y.new_zeros(y.shape[0])
    for j in range(k):
        for m in range(k):
            if j != m:
                ym_sq = (y[:, m] * y[:, m]).sum(-1)
                coef = (y[:, j] * y[:, m]).sum(-1) / (ym_sq + eps)
                per_token = per_token + coef.square() * ym_sq
    return _mean_over(per_token / k, valid_T)


def spec_variance(gates_TE, probs_TE, valid_T, form):
    """Section 4: -(1/E) sum_e Var_t(g_t,e) (population), or the per_token form on p."""
    keep = valid_T if valid_T is not None else torch.ones(gates_TE.shape[0], dtype=torch.bool)
    if form == "per_token":
        return -_mean_over(probs_TE.double().var(dim=1, unbiased=False), keep)
    g = gates_TE.double()[keep]
    if g.shape[0] == 0:
        return gates_TE.sum() * 0.0
    return -g.var(dim=0, unbiased=False).mean()


def spec_coupling(a, b, valid_T, form):
    """Section 2: -mean_t M_t^l M_t^l' with M the top-k mass of the pre-top-k p (or the log form)."""
    m_a = a["p"].double().gather(1, a["topk_idx"]).sum(1)
    m_b = b["p"].double().gather(1, b["topk_idx"]).sum(1)
    joint = m_a * m_b if form == "product" else torch.log(m_a * m_b + 1e-9)
    return -_mean_over(joint, valid_T)


def independent_loss(kind, layers, spec, valid=None):
    """Each layer's loss (R_cp: each adjacent pair's, under the earlier layer); ``valid``: one [T]
    mask per layer."""
    valid = valid or [None] * len(layers)
    if kind == "sp":
        return [spec_specialization(l["z"], v, spec.sp_similarity, spec.eps) for l, v in zip(layers, valid)]
    if kind == "ortho":
        return [spec_orthogonality(l["y"], v, spec.eps) for l, v in zip(layers, valid)]
    if kind == "var":
        return [spec_variance(l["gates"], l["p"], v, spec.v_form) for l, v in zip(layers, valid)]
    if kind == "cp":
        return [spec_coupling(a, b, None if va is None else va & vb, spec.cp_form)
                for a, b, va, vb in zip(layers[:-1], layers[1:], valid[:-1], valid[1:])]
    raise ValueError(kind)


COEFF_FIELD = {"sp": "sp_coeff", "ortho": "ortho_coeff", "var": "var_coeff", "cp": "cp_coeff"}
TRACKER_NAME = {"sp": "specialization_loss", "ortho": "orthogonality_loss", "var": "variance_loss",
                "cp": "coupling_loss"}


def run_model(settings, spec, params_from=None, padding_mask=None, expert_bias=False, lm_weight=1.0):
    """Forward + backward of ``lm_weight`` x the LM loss (the specialization losses ride along through
    megatron's aux-loss autoscaler whatever that weight); returns the model, its MoE layers, the
    gradients, the captured MoE inputs, the parameters and megatron's tracker."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_moe_spec.core import moe_tracker
    from megatron_moe_spec.core.layer_specs import get_moe_block_spec

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
    moe_tracker.clear()
    inputs = {}
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    hooks = [m.register_forward_pre_hook(functools.partial(lambda i, mod, args, kw: inputs.__setitem__(i, args[0] if args else kw["hidden_states"]), i), with_kwargs=True)
             for i, m in enumerate(moe_layers)]
    routing_maps = {}
    hooks += [m.router.register_forward_hook(functools.partial(lambda i, mod, args, out: routing_maps.__setitem__(i, out[1].detach()), i))
              for i, m in enumerate(moe_layers)]
    batch = global_microbatches(settings, 1)[0]
    extra = {} if padding_mask is None else {"padding_mask": padding_mask}
    out = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                labels=batch["labels"], **extra)
    lm = out.float().mean() * lm_weight
    params = [p for p in model.parameters()]
    global NAMES
    NAMES = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(lm, params, retain_graph=True, allow_unused=True)
    for h in hooks:
        h.remove()
    tracker = {k: moe_tracker.values(k).clone() for k in moe_tracker.recorded_names()}
    run_model.routing_maps = routing_maps
    return model, moe_layers, grads, inputs, params, tracker


def assert_gradients_match(params, grads, expected, what=""):
    """Each parameter's gradient equals the independent one to RTOL of that parameter's own
    reference gradient (+ FLOOR of the loss's largest); where the reference is 0 (the loss cannot
    reach it), to UNREACHED_RTOL of the loss's largest reference gradient. Returns the names of the
    parameters the loss reaches."""
    zeros = [torch.zeros_like(p) for p in params]
    grads = [g if g is not None else z for g, z in zip(grads, zeros)]
    expected = [g if g is not None else z for g, z in zip(expected, zeros)]
    loss_scale = max(float(e.abs().max()) for e in expected)
    assert loss_scale > 0, f"{what}: the loss has no gradient at all"
    reached, problems = [], []
    for name, got, exp in zip(NAMES, grads, expected):
        own = float(exp.abs().max())
        tol = RTOL * own + FLOOR * loss_scale if own > 0 else UNREACHED_RTOL * loss_scale
        err = float((got.double() - exp.double()).abs().max())
        if err > tol:
            problems.append(f"{name}: max|err| {err:.3e} > {tol:.3e} (max|ref| {own:.3e}, loss max {loss_scale:.3e})")
        if own > 0:
            reached.append(name)
    assert not problems, f"{what}: gradients differ from the independent computation:\n  " + "\n  ".join(problems)
    return reached


LOSS_ALONE = TinyGPTSettings(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, micro_batch_size=2,
                             seq_length=8, moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none")
LAST = LOSS_ALONE.num_layers - 1  # every layer is an MoE layer; the last one feeds no other
# Parameters each loss cannot reach (the spec's "gradient flows into ..."): nothing after the last
# layer's MoE output; R_sp and L_o not the last layer's router (the gate multiplies neither z nor y),
# R_sp not its fc2 either; R_cp and L_v (routing only) not the last layer's experts.
UNREACHABLE = {
    "sp": (f"layers.{LAST}.mlp.router.", f"layers.{LAST}.mlp.experts.", "linear_fc2"),
    "ortho": (f"layers.{LAST}.mlp.router.",),
    "var": (f"layers.{LAST}.mlp.experts.",),
    "cp": (f"layers.{LAST}.mlp.experts.",),
}


def unreachable(kind, name):
    if name.startswith("output_layer.") or "final_layernorm" in name:
        return True
    rules = UNREACHABLE[kind]
    if kind == "sp":
        return rules[0] in name or (rules[1] in name and rules[2] in name)
    return any(rule in name for rule in rules)


@pytest.mark.parametrize("kind", ["sp", "ortho", "var", "cp"])
def test_each_loss_alone_matches_independent_gradient(megatron_single_process, kind):
    """Only this loss on (LM weight 0, no load balancing): value per layer, and every parameter's
    gradient relative to this loss's own gradient; R_sp and L_o leave the router alone."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    coeff = 0.5
    spec_on = SpecializationConfig(**{COEFF_FIELD[kind]: coeff})
    model_on, _, grads, _, _, tracker = run_model(LOSS_ALONE, spec_on, lm_weight=0.0)
    names_on = list(NAMES)
    # The reference: megatron's stock model (no code of ours in its graph), same weights.
    _, moe_ref, _, inputs, params, _ = run_model(LOSS_ALONE, SpecializationConfig(), params_from=model_on)
    assert NAMES == names_on

    layers = [independent_layer(m, inputs[i]) for i, m in enumerate(moe_ref)]
    values = independent_loss(kind, layers, spec_on)
    expected = torch.autograd.grad(coeff * sum(values), params, allow_unused=True)

    # Values: the tracker holds each layer's loss (R_cp under the earlier layer of the pair).
    logged = tracker[TRACKER_NAME[kind]][: len(values)]
    assert torch.allclose(logged.double(), torch.stack(values).detach(), rtol=1e-5, atol=1e-7), (logged, values)

    reached = assert_gradients_match(params, grads, expected, kind)
    # The reference agrees with the spec on what the loss reaches (so the check above had something
    # to see everywhere else) ...
    assert [n for n in reached if unreachable(kind, n)] == []
    assert any("router" in n for n in reached) == (kind != "sp" or LAST > 0)
    assert any("local_experts" in n for n in reached)
    # ... and the model puts (near) nothing where the loss cannot reach, the router above all.
    loss_scale = max(float(g.abs().max()) for g in grads if g is not None)
    for name, g in zip(NAMES, grads):
        if unreachable(kind, name) and g is not None:
            assert float(g.abs().max()) <= UNREACHED_RTOL * loss_scale, \
                f"{kind} puts a gradient on {name}: {float(g.abs().max()):.3e} (loss max {loss_scale:.3e})"


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
    settings = LOSS_ALONE.replace(**changes)
    padding = None
    if with_padding:
        padding = torch.zeros(settings.micro_batch_size, settings.seq_length, dtype=torch.bool)
        padding[0, -3:] = True
        padding[1, -5:] = True
    coeff = 0.5
    spec_on = SpecializationConfig(**{COEFF_FIELD[kind]: coeff})
    model_on, _, grads_on, _, _, tracker = run_model(settings, spec_on, padding_mask=padding,
                                                     expert_bias=(variant == "sigmoid_expert_bias"),
                                                     lm_weight=0.0)
    model_ref, moe_ref, _, inputs, params, _ = run_model(
        settings, SpecializationConfig(), params_from=model_on, padding_mask=padding)
    maps = run_model.routing_maps

    from_megatron = variant in ("group_limited_topk", "sigmoid_expert_bias")
    layers = [independent_layer(m, inputs[i], maps[i] if from_megatron else None) for i, m in enumerate(moe_ref)]
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
    expected_grads = torch.autograd.grad(coeff * sum(values), params, allow_unused=True)
    logged = tracker[TRACKER_NAME[kind]][: len(values)]
    assert torch.allclose(logged.double(), torch.stack(values).detach(), rtol=1e-5, atol=1e-7), (logged, values)
    assert_gradients_match(params, grads_on, expected_grads, f"{kind} {variant}")


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


def test_top1_routing_leaves_only_the_variance_loss(megatron_single_process, caplog):
    """k = 1: R_sp and L_o are 0 by the spec (one expert per token, no pair), so with R_sp, L_o and L_v
    on, the gradient is exactly L_v's (against the independent computation, LM weight 0), nothing of
    R_sp or L_o is logged, and the start-up says so for each of them."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_moe_spec.core.layer_specs import check_compatibility

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    settings = LOSS_ALONE.replace(moe_router_topk=1,
                                  extra_config={"moe_router_pre_softmax": True})  # megatron's rule for k = 1
    spec = SpecializationConfig(sp_coeff=0.5, ortho_coeff=0.5, var_coeff=0.1)
    model_on, _, grads, _, _, tracker = run_model(settings, spec, lm_weight=0.0)
    _, moe_ref, _, inputs, params, _ = run_model(settings, SpecializationConfig(), params_from=model_on)
    layers = [independent_layer(m, inputs[i]) for i, m in enumerate(moe_ref)]
    values = {kind: independent_loss(kind, layers, spec) for kind in ("sp", "ortho", "var")}
    assert all(float(v.detach()) == 0.0 for kind in ("sp", "ortho") for v in values[kind])  # the spec's k = 1
    assert all(float(v.detach()) != 0.0 for v in values["var"])  # top-1 gates (pre-softmax p) do vary
    total = sum(getattr(spec, COEFF_FIELD[kind]) * sum(v) for kind, v in values.items())
    expected = torch.autograd.grad(total, params, allow_unused=True)
    assert_gradients_match(params, grads, expected, "k=1")
    assert torch.allclose(tracker["variance_loss"].double(), torch.stack(values["var"]).detach(), rtol=1e-5, atol=1e-7)
    for name in ("specialization_loss", "orthogonality_loss"):
        assert name not in tracker or float(tracker[name].abs().sum()) == 0.0, name

    config = build_transformer_config(settings)
    for field in ("sp_coeff", "ortho_coeff"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            check_compatibility(config, SpecializationConfig(**{field: 1e-3}))
        assert "moe_router_topk" in caplog.text, f"{field} with k = 1: no start-up note"


def test_cross_stage_coupling_pairs_are_named_in_a_startup_warning(megatron_single_process, caplog):
    """With cp_pipeline: skip, R_cp pairs split across pipeline stages / chunks are left out, never
    silently (spec section 2), named by the 0-based indices of the logs; exact (the default) warns not."""
    import dataclasses
    import logging

    from megatron_moe_spec.core.layer_specs import check_compatibility, cross_stage_pairs, moe_layer_numbers

    config = build_transformer_config(TinyGPTSettings(num_layers=4))
    pp2 = dataclasses.replace(config, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    pp2_vpp2 = dataclasses.replace(pp2, virtual_pipeline_model_parallel_size=2)
    assert cross_stage_pairs(config, moe_layer_numbers(config)) == []
    assert cross_stage_pairs(pp2, moe_layer_numbers(pp2)) == [(2, 3)]
    assert cross_stage_pairs(pp2_vpp2, moe_layer_numbers(pp2_vpp2)) == [(1, 2), (2, 3), (3, 4)]
    from megatron_moe_spec.core import layer_specs

    layer_specs._WARNED_PAIRS.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_moe_spec.core.layer_specs"):
        check_compatibility(pp2, SpecializationConfig(cp_coeff=1e-3))
    assert "left out of R_cp" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="megatron_moe_spec.core.layer_specs"):
        check_compatibility(pp2, SpecializationConfig(cp_coeff=1e-3, cp_pipeline="skip"))
    assert "(1, 2)" in caplog.text and "left out of R_cp" in caplog.text


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
