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

from megatron_moe_spec import cpu, losses
from megatron_moe_spec.specialization_config import SpecializationConfig
from megatron_moe_spec.testing.distributed import ParallelSizes, init_megatron, teardown_megatron
from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, build_model, build_transformer_config, global_microbatches

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def megatron_single_process():
    import os

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from megatron_moe_spec.testing.distributed import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    init_megatron(0, 1, ParallelSizes())
    yield
    teardown_megatron()
    cpu.disable()


def independent_layer(moe, x_SBH):
    """Routing, z and y of one MoE layer from its input and weights (no megatron code)."""
    x = x_SBH.reshape(-1, x_SBH.shape[-1])
    logits = x @ moe.router.weight.t()
    p = torch.softmax(logits.float(), dim=-1)
    k = moe.config.moe_router_topk
    topk_idx = torch.topk(p, k, dim=-1).indices.sort(dim=-1).values  # ascending expert order
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


def independent_loss(kind, layers, spec):
    if kind == "sp":
        return [losses.specialization_loss(l["z"], similarity=spec.sp_similarity) for l in layers]
    if kind == "ortho":
        return [losses.orthogonality_loss(l["y"]) for l in layers]
    if kind == "var":
        return [losses.variance_loss(l["gates"], form=spec.v_form, probs=l["p"]) for l in layers]
    if kind == "cp":
        return [losses.coupling_loss(a["p"], a["topk_idx"], b["p"], b["topk_idx"], form=spec.cp_form)
                for a, b in zip(layers[:-1], layers[1:])]
    raise ValueError(kind)


COEFF_FIELD = {"sp": "sp_coeff", "ortho": "ortho_coeff", "var": "var_coeff", "cp": "cp_coeff"}
TRACKER_NAME = {"sp": "specialization_loss", "ortho": "orthogonality_loss", "var": "variance_loss",
                "cp": "coupling_loss"}


def run_model(settings, spec, params_from=None):
    """Forward+backward of the LM loss; returns the model, its grads and the captured MoE inputs."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    from megatron_moe_spec.core.layer_specs import get_moe_block_spec
    from megatron_moe_spec.core.moe_layer import SpecializationMoELayer

    config = build_transformer_config(settings)
    torch.manual_seed(1234)
    model = build_model(config, settings, functools.partial(get_moe_block_spec, spec_config=spec),
                        wrap_ddp=False)[0]
    if params_from is not None:
        model.load_state_dict(params_from.state_dict())
    model.train()
    clear_aux_losses_tracker()
    inputs = {}
    moe_layers = [m for m in model.modules() if isinstance(m, SpecializationMoELayer)]
    hooks = [m.register_forward_pre_hook(functools.partial(lambda i, mod, args, kw: inputs.__setitem__(i, args[0] if args else kw["hidden_states"]), i), with_kwargs=True)
             for i, m in enumerate(moe_layers)]
    batch = global_microbatches(settings, 1)[0]
    out = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                labels=batch["labels"])
    lm = out.float().mean()
    params = [p for p in model.parameters()]
    global NAMES
    NAMES = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(lm, params, retain_graph=True, allow_unused=True)
    for h in hooks:
        h.remove()
    tracker = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
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
