"""The MoE layer's own mechanics: megatron's routed_experts_compute via super(), the z/y exchange
only when something consumes it, in the experts' dtype, the sp_max_tokens subset by global
position (layout-independent), and R_cp's checked recompute queues.
"""
import functools

import pytest
import torch

from megatron_moe_spec import losses
from megatron_moe_spec.core.layer_specs import get_moe_block_spec
from megatron_moe_spec.specialization_config import SpecializationConfig
from megatron_moe_spec.testing.compare import assert_same_step
from megatron_moe_spec.testing.distributed import ParallelSizes, run_distributed
from megatron_moe_spec.testing.tiny_gpt import (
    TinyGPTSettings,
    build_model,
    build_transformer_config,
    global_microbatches,
    train_step_result,
)

pytestmark = pytest.mark.timeout(600)

SMALL = TinyGPTSettings(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, micro_batch_size=2,
                        seq_length=8, moe_aux_loss_coeff=0.0)


def spec_fn(spec_config):
    return functools.partial(get_moe_block_spec, spec_config=spec_config)


def one_model(settings, spec_config, seed=1234):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    config = build_transformer_config(settings)
    torch.manual_seed(seed)
    model = build_model(config, settings, spec_fn(spec_config), wrap_ddp=False)[0]
    model.train()
    return model


def forward(model, settings, index=0):
    batch = global_microbatches(settings, index + 1)[index]
    return model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                 labels=batch["labels"]).float().mean()


def moe_layers(model):
    from megatron_moe_spec.core.moe_layer import SpecializationMoELayer

    return [m for m in model.modules() if isinstance(m, SpecializationMoELayer)]


# ----------------------------------------------------------------------------- sp_max_tokens subset
def brute_force_subset(seq_len, batch, max_tokens, offset=0):
    """{(b, s)} with (b * seq_len + s) % c == offset % c, c = ceil(N / max_tokens), by a plain loop."""
    n = seq_len * batch
    stride = (n + max_tokens - 1) // max_tokens
    return {(b, s) for b in range(batch) for s in range(seq_len) if (b * seq_len + s) % stride == offset % stride}


@pytest.mark.parametrize("seq_len,batch,max_tokens,shards", [(8, 2, 5, 1), (8, 2, 5, 2), (12, 3, 7, 4),
                                                             (16, 2, 64, 2), (6, 4, 1, 3)])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_global_strided_mask_is_the_same_subset_on_every_shard(seq_len, batch, max_tokens, shards, offset):
    expected = brute_force_subset(seq_len, batch, max_tokens, offset)
    assert 0 < len(expected) <= max_tokens
    chunk = seq_len // shards
    got = set()
    for r in range(shards):
        mask = losses.global_strided_mask(seq_len, batch, r * chunk, chunk, max_tokens, offset=offset)
        assert mask.shape == (chunk * batch,)
        for i in torch.nonzero(mask).flatten().tolist():  # local token i = (s, b), sequence-major
            got.add((i % batch, r * chunk + i // batch))
    assert got == expected


@pytest.mark.parametrize("seq_len,batch,max_tokens", [(8, 2, 5), (12, 3, 7), (6, 4, 1), (16, 2, 64)])
def test_rotating_offsets_choose_every_position_exactly_once(seq_len, batch, max_tokens):
    """Over c = ceil(N / max_tokens) consecutive steps every position is in exactly one subset: the
    mean over a cycle of the per-step sums is the full sum / c (the basis of the unbiasedness)."""
    stride = -(-seq_len * batch // max_tokens)
    masks = torch.stack([losses.global_strided_mask(seq_len, batch, 0, seq_len, max_tokens, offset=o)
                         for o in range(stride)])
    assert torch.equal(masks.sum(0), torch.ones(seq_len * batch, dtype=torch.long))
    assert torch.equal(masks[0], losses.global_strided_mask(seq_len, batch, 0, seq_len, max_tokens,
                                                            offset=stride))


@pytest.mark.parametrize("step", [0, 3])
def test_budget_in_one_process_is_rsp_of_the_global_subset(megatron_single_process, monkeypatch, step):
    """The layer's budgeted R_sp is the pure R_sp on exactly the subset's tokens (independent z), whose
    rows alone reach the kernel; the subset rotates with the step given to begin_step."""
    from test_core_independent import independent_layer

    spec = SpecializationConfig(sp_coeff=0.5, sp_max_tokens=5)
    model = one_model(SMALL, spec)
    for m in moe_layers(model):
        m.begin_step(metrics=False, step=step)
    calls, inputs = [], {}
    real = losses.specialization_loss

    def spy(z, valid=None, *args, **kwargs):
        value = real(z, valid, *args, **kwargs)
        calls.append((value.detach(), z.shape[0], valid))
        return value

    monkeypatch.setattr(losses, "specialization_loss", spy)
    layers = moe_layers(model)
    hooks = [m.register_forward_pre_hook(functools.partial(
        lambda i, mod, args, kw: inputs.__setitem__(i, args[0] if args else kw["hidden_states"]), i),
        with_kwargs=True) for i, m in enumerate(layers)]
    forward(model, SMALL)
    for h in hooks:
        h.remove()
    assert len(calls) == len(layers)
    mask_T = losses.global_strided_mask(SMALL.seq_length, SMALL.micro_batch_size, 0, SMALL.seq_length, 5,
                                        offset=step)
    # 16 positions, stride 4: (b, s) in {(0,0),(0,4),(1,0),(1,4)} at step 0, s + 3 at step 3
    assert int(mask_T.sum()) == 4 and bool(mask_T[0]) == (step == 0)
    for i, (value, rows, valid) in enumerate(calls):
        assert valid is None and rows == int(mask_T.sum()), "the kernel gets the chosen tokens' rows only"
        ref = independent_layer(layers[i], inputs[i])
        expected = real(ref["z"], mask_T)
        full = real(ref["z"])
        expected, full = float(expected.detach()), float(full.detach())
        assert abs(float(value) - expected) <= 1e-5 * abs(expected)
        assert abs(full - expected) > 1e-3 * abs(expected), "the subset must matter"


BUDGET = SpecializationConfig(sp_coeff=0.05, ortho_coeff=0.05, sp_max_tokens=11)
BUDGET_METRICS = SpecializationConfig(sp_coeff=0.05, ortho_coeff=0.05, sp_max_tokens=11, metrics=True)
# (name, settings, world, parallel, dp, spec, selected-rows exchange expected)
BUDGET_LAYOUTS = [
    ("tp2_sp", TinyGPTSettings(num_moe_experts=4, moe_ffn_hidden_size=32), 2, ParallelSizes(tp=2), 1,
     BUDGET_METRICS, False),
    ("tp2_ep2", TinyGPTSettings(num_moe_experts=4, moe_ffn_hidden_size=32), 4, ParallelSizes(tp=2, ep=2), 2,
     BUDGET, True),
    ("ep2_alltoall", TinyGPTSettings(num_moe_experts=4, moe_ffn_hidden_size=32), 2, ParallelSizes(ep=2), 2,
     BUDGET, True),
    # A metrics step reads every token's z: the full exchange, and the budgeted losses still exact.
    ("ep2_alltoall_metrics", TinyGPTSettings(num_moe_experts=4, moe_ffn_hidden_size=32), 2, ParallelSizes(ep=2), 2,
     BUDGET_METRICS, False),
    ("ep2_allgather", TinyGPTSettings(num_moe_experts=4, moe_ffn_hidden_size=32,
                                      moe_token_dispatcher_type="allgather"), 2, ParallelSizes(ep=2), 2,
     BUDGET, False),
]


BUDGET_STEP = 2  # the training step the parity runs take (the subset's offset: 2 of stride 3)


def step_counting_selected_exchanges(*args, **kwargs):
    """train_step_result at training step BUDGET_STEP, plus how many times the selected-rows exchange
    ran on this rank."""
    from megatron_moe_spec.core import token_exchange
    from megatron_moe_spec.core.moe_layer import SpecializationMoELayer
    from megatron_moe_spec.testing.tiny_gpt import train_step_result as step

    calls = []
    real, real_init = token_exchange.selected_rows_exchange, SpecializationMoELayer.__init__

    def counting(dispatcher, rows, select):
        calls.append(int(select.sum()))
        return real(dispatcher, rows, select)

    def init_at_step(self, *a, **kw):
        real_init(self, *a, **kw)
        self.begin_step(metrics=True, step=BUDGET_STEP)  # metrics=True: the default before any begin_step

    token_exchange.selected_rows_exchange, SpecializationMoELayer.__init__ = counting, init_at_step
    try:
        result = step(*args, **kwargs)
    finally:
        token_exchange.selected_rows_exchange, SpecializationMoELayer.__init__ = real, real_init
    result["selected_exchanges"] = calls
    return result


@pytest.mark.multirank
@pytest.mark.parametrize("name,settings,world,parallel,dp,spec,selected", BUDGET_LAYOUTS,
                         ids=[l[0] for l in BUDGET_LAYOUTS])
def test_budgeted_losses_match_one_process(name, settings, world, parallel, dp, spec, selected):
    """sp_max_tokens picks the same tokens in every layout: loss, gradients and logged values equal
    one process at the same training step (the subset's offset; before, each TP rank took
    max_tokens // tp of its own shard). Under EP with the
    alltoall dispatcher only the selected tokens' rows travel (forward and backward), and the step
    is still that of one process."""
    single = settings.replace(num_microbatches=settings.num_microbatches * dp)
    ref = run_distributed(step_counting_selected_exchanges, 1, ParallelSizes(), args=(single, spec_fn(spec)))[0]
    full = run_distributed(train_step_result, 1, ParallelSizes(),
                           args=(single, spec_fn(SpecializationConfig(sp_coeff=0.05, ortho_coeff=0.05))),
                           kwargs={"initial_params": ref["params"]})[0]
    sp_ref = ref["tracker"]["specialization_loss"]
    assert any(abs(a - b) > 1e-3 * abs(b) for a, b in zip(sp_ref, full["tracker"]["specialization_loss"])), \
        "the budget must change R_sp here, or this test cannot see a wrong subset"
    results = run_distributed(step_counting_selected_exchanges, world, parallel, args=(settings, spec_fn(spec)),
                              kwargs={"initial_params": ref["params"]})
    for result in results:
        if selected:
            assert result["selected_exchanges"], "the selected-rows exchange must run in this layout"
        else:
            assert not result["selected_exchanges"]
        assert_same_step(ref, result, rtol=1e-5)
        for name_ in ("specialization_loss", "orthogonality_loss"):
            for a, b in zip(ref["tracker"][name_], result["tracker"][name_]):
                assert abs(a - b) <= 1e-5 * max(abs(a), 1e-6), (name_, b, a)


def exchange_bytes_step(settings, spec_fn_):
    """One training step: all-to-all payload bytes sent, by dtype, inside the z/y exchange's forward
    (``"exchange"``) and over the whole step, forward and backward (``"step"``)."""
    import torch.distributed as dist

    from megatron_moe_spec.core import moe_layer
    from megatron_moe_spec.testing.tiny_gpt import train_step_result as step

    sent = {"exchange": {}, "step": {}}
    inside = [False]
    real_a2a, real_exchange = dist.all_to_all_single, moe_layer.rows_to_tokens

    def counted_a2a(output, input, *args, **kwargs):
        for where in ("exchange", "step") if inside[0] else ("step",):
            key = str(input.dtype).replace("torch.", "")
            sent[where][key] = sent[where].get(key, 0) + input.numel() * input.element_size()
        return real_a2a(output, input, *args, **kwargs)

    def exchange(*args, **kwargs):
        inside[0] = True
        try:
            return real_exchange(*args, **kwargs)
        finally:
            inside[0] = False

    dist.all_to_all_single, moe_layer.rows_to_tokens = counted_a2a, exchange
    try:
        step(settings, spec_fn_)
    finally:
        dist.all_to_all_single, moe_layer.rows_to_tokens = real_a2a, real_exchange
    return sent


@pytest.mark.multirank
def test_a_sixteenth_budget_moves_a_sixteenth_of_the_rows():
    """EP2 alltoall, sp_max_tokens = 1/16 of a micro-batch's tokens: the exchange's all-to-all moves at
    most 1/16 of exact mode's row bytes, forward and backward, plus the 1-byte-per-row selection mask."""
    settings = TinyGPTSettings(num_moe_experts=4, moe_ffn_hidden_size=32, seq_length=64, micro_batch_size=2,
                               num_layers=2)
    tokens = settings.seq_length * settings.micro_batch_size

    def run(spec):
        return run_distributed(exchange_bytes_step, 2, ParallelSizes(ep=2), args=(settings, spec_fn(spec)))

    losses_on = dict(sp_coeff=0.05, ortho_coeff=0.05)
    off = run(SpecializationConfig())
    exact = run(SpecializationConfig(**losses_on))
    budget = run(SpecializationConfig(**losses_on, sp_max_tokens=tokens // 16))
    layers, k, width = settings.num_layers, settings.moe_router_topk, 32 + settings.hidden_size
    # Summed over both ranks: an expert rank sends the rows its experts computed (their number depends
    # on the routing), the token's rank the mask of its own rows and, in backward, their gradients.
    rows_bytes = 2 * layers * tokens * k * width * 4  # every routed row of both ranks, F + H fp32 values

    def total(results, where, dtype):
        return sum(r[where].get(dtype, 0) for r in results)

    assert {key for r in exact for key in r["exchange"]} == {"float32"}
    assert total(exact, "exchange", "float32") == rows_bytes
    assert total(budget, "exchange", "uint8") == 2 * layers * tokens * k  # the mask: one byte per routed row
    assert 0 < total(budget, "exchange", "float32") <= rows_bytes / 16, budget
    exact_extra = total(exact, "step", "float32") - total(off, "step", "float32")
    budget_extra = total(budget, "step", "float32") - total(off, "step", "float32")
    assert exact_extra == 2 * rows_bytes, (exact, off)  # the rows forward, their gradients backward
    assert 0 < budget_extra <= exact_extra / 16, (budget, exact, off)
    assert total(budget, "step", "uint8") == 2 * layers * tokens * k  # the mask travels forward only


# ----------------------------------------------------------------------------- super() and the exchange
def test_megatrons_routed_experts_compute_runs_once_per_layer(megatron_single_process, monkeypatch):
    """No copied body: the layer calls megatron's own method (whatever it does in this version)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    model = one_model(SMALL, SpecializationConfig(sp_coeff=0.5, ortho_coeff=0.5, metrics=True))
    calls = []
    real = MoELayer.routed_experts_compute

    def counting(self, *args, **kwargs):
        calls.append(self.layer_number)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MoELayer, "routed_experts_compute", counting)
    forward(model, SMALL).backward()
    assert sorted(calls) == sorted(m.layer_number for m in moe_layers(model))


def count_exchanges(monkeypatch):
    from megatron_moe_spec.core import moe_layer

    calls = []
    real = moe_layer.rows_to_tokens

    def counting(dispatcher, rows, *args):
        calls.append((rows.shape[-1], rows.dtype))
        return real(dispatcher, rows, *args)

    monkeypatch.setattr(moe_layer, "rows_to_tokens", counting)
    return calls


def test_rows_travel_only_when_a_loss_or_metric_consumes_them(megatron_single_process, monkeypatch):
    calls = count_exchanges(monkeypatch)
    spec = SpecializationConfig(sp_coeff=0.5, ortho_coeff=0.5, cp_coeff=0.5, metrics=True)
    model = one_model(SMALL, spec)
    layers = moe_layers(model)
    n = len(layers)
    for m in layers:
        m.begin_step(metrics=False)
    model.eval()
    with torch.no_grad():
        forward(model, SMALL)
    assert calls == [], "evaluation needs no z/y"
    model.train()
    with torch.no_grad():
        forward(model, SMALL)
    assert calls == [], "a no-grad forward without a metrics step needs no z/y"
    forward(model, SMALL).backward()
    assert len(calls) == n and all(width == 32 + 64 for width, _ in calls), calls  # z (F) and y (H)
    # Metrics only: z travels on metrics steps alone, and y never.
    calls.clear()
    model = one_model(SMALL, SpecializationConfig(metrics=True))
    for m in moe_layers(model):
        m.begin_step(metrics=False)
    forward(model, SMALL).backward()
    assert calls == [], "no metrics step: nothing consumes z"
    for m in moe_layers(model):
        m.begin_step(metrics=True)
    forward(model, SMALL).backward()
    assert len(calls) == n and all(width == 32 for width, _ in calls), "metrics step: z only"


def test_under_recomputation_only_one_pass_exchanges(megatron_single_process, monkeypatch):
    calls = count_exchanges(monkeypatch)
    settings = SMALL.replace(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model = one_model(settings, SpecializationConfig(sp_coeff=0.5, cp_coeff=0.5))
    for m in moe_layers(model):
        m.begin_step(metrics=False)
    forward(model, settings).backward()
    assert len(calls) == len(moe_layers(model)), "the recompute pass alone needs z"


def saved_fp32_elements(fn):
    """Elements of every fp32 tensor autograd saves for backward while ``fn`` runs."""
    total = [0]

    def pack(t):
        if t.dtype == torch.float32:
            total[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_bf16_rows_travel_in_bf16_and_no_fp32_copy_is_saved(megatron_single_process, monkeypatch):
    """In bf16 the exchange moves bf16 rows, and R_sp + L_o save no fp32 [T, k, F] copy of z."""
    settings = SMALL.replace(moe_ffn_hidden_size=96, extra_config={
        "params_dtype": torch.bfloat16, "bf16": True, "pipeline_dtype": torch.bfloat16})
    calls = count_exchanges(monkeypatch)
    spec_on = SpecializationConfig(sp_coeff=0.5, ortho_coeff=0.5)
    model_on = one_model(settings, spec_on)
    model_off = one_model(settings, SpecializationConfig(var_coeff=0.5))  # records routing, no z/y
    model_off.load_state_dict(model_on.state_dict())
    extra = saved_fp32_elements(lambda: forward(model_on, settings)) - \
        saved_fp32_elements(lambda: forward(model_off, settings))
    assert calls and all(dtype == torch.bfloat16 for _, dtype in calls), calls
    T, k, F = settings.seq_length * settings.micro_batch_size, settings.moe_router_topk, 96
    layers = len(moe_layers(model_on))
    assert extra < layers * T * k * F / 4, f"{extra} fp32 elements saved beyond the stock model"


def saved_storage_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs (a view saves its
    whole storage: counted once, at full size)."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_a_budget_cuts_the_saved_token_rows_by_its_fraction(megatron_single_process):
    """Beyond the stock model, exact R_sp + L_o save two copies of the routed rows: the expert-order rows
    [R, F + H] that ungate keeps (R = T k) and the token-order [T, k, F + H] that the Gram kernels keep.
    With sp_max_tokens = T / 4 the kernels keep the chosen tokens' rows only: the second copy shrinks to a
    quarter (ungate's stays whole: docs/overhead.md)."""
    settings = SMALL.replace(seq_length=32, moe_ffn_hidden_size=96)
    T = settings.seq_length * settings.micro_batch_size
    base = one_model(settings, SpecializationConfig(var_coeff=0.5))  # records routing, no z/y
    extra = {}
    for budget in (None, T // 4):
        model = one_model(settings, SpecializationConfig(sp_coeff=0.5, ortho_coeff=0.5, sp_max_tokens=budget))
        model.load_state_dict(base.state_dict())
        for m in moe_layers(model):
            m.begin_step(metrics=False, step=0)
        extra[budget] = saved_storage_bytes(lambda: forward(model, settings)) - \
            saved_storage_bytes(lambda: forward(base, settings))
    k, F, H = settings.moe_router_topk, 96, settings.hidden_size
    rows_bytes = len(moe_layers(base)) * T * k * (F + H) * 4
    small = 0.1 * rows_bytes  # gates, masks, indices and Gram matrices: O(T k) and O(T k^2) per layer
    assert extra[None] >= 2 * rows_bytes, (extra, rows_bytes)  # the exact losses keep both copies
    assert extra[T // 4] <= rows_bytes + rows_bytes / 4 + small, (extra, rows_bytes)


# ----------------------------------------------------------------------------- ungate
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ungate_cancels_the_gate_path_exactly(dtype):
    """A loss on ungate(g * z, g) has the gradient of the loss on z, and none on g."""
    from megatron_moe_spec.core.expert_capture import ungate

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    g = (torch.rand(6, generator=gen, dtype=torch.float64) + 0.1).float().requires_grad_()
    weights = torch.randn(5, generator=gen).to(dtype)
    gz = z * g.to(dtype).unsqueeze(-1)  # as the expert multiplies its rows
    out = ungate(gz, g)
    assert out.dtype == dtype
    loss = (out.float() * weights.float()).square().sum()
    grad_z, grad_g = torch.autograd.grad(loss, (z, g))
    direct_z, = torch.autograd.grad((z.float() * weights.float()).square().sum(), (z,))
    scale = float(direct_z.float().abs().max())
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert float((grad_z.float() - direct_z.float()).abs().max()) <= tol * scale
    assert float(grad_g.abs().max()) <= (1e-6 if dtype == torch.float32 else 2e-2) * scale
    # Rows whose gate is 0 come out as 0, with no gradient.
    zero = ungate(torch.ones(2, 3, requires_grad=True), torch.zeros(2, requires_grad=True))
    assert torch.equal(zero, torch.zeros(2, 3))


# ----------------------------------------------------------------------------- R_cp recompute queues
RECOMPUTE = SMALL.replace(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
CP_ONLY = SpecializationConfig(cp_coeff=0.5)


def router_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "router" in n and p.grad is not None}


def test_a_stray_no_grad_forward_is_refused_not_mispaired(megatron_single_process):
    """A training-mode forward without backward leaves first-pass entries behind; the next
    micro-batch's recompute pass must not pair with them silently."""
    model = one_model(RECOMPUTE, CP_ONLY)
    for m in moe_layers(model):
        m.begin_step(metrics=False)
    with torch.no_grad():
        forward(model, RECOMPUTE, index=1)  # a different micro-batch, no backward
    with pytest.raises(RuntimeError, match="belongs to another micro-batch"):
        forward(model, RECOMPUTE, index=0).backward()


def test_begin_step_drops_stray_entries_and_the_gradient_is_exact(megatron_single_process):
    """R_cp's gradient alone (LM weighted 0, load balancing off) equals the run without recompute."""
    reference = one_model(RECOMPUTE.replace(recompute_granularity=None, recompute_method=None,
                                            recompute_num_layers=None), CP_ONLY)
    (0.0 * forward(reference, RECOMPUTE)).backward()
    model = one_model(RECOMPUTE, CP_ONLY)
    model.load_state_dict(reference.state_dict())
    with torch.no_grad():
        forward(model, RECOMPUTE, index=1)
    for m in moe_layers(model):
        m.begin_step(metrics=False)
    (0.0 * forward(model, RECOMPUTE)).backward()
    expected, got = router_grads(reference), router_grads(model)
    assert expected and set(expected) == set(got)
    for name, grad in expected.items():
        assert float((got[name] - grad).abs().max()) <= 1e-5 * float(grad.abs().max()), name


# ----------------------------------------------------------------------------- per-token loss
@pytest.mark.multirank
def test_per_token_loss_counts_capacity_dropped_tokens():
    """Under per-token loss megatron divides every gradient by the LM token count, which includes
    capacity-dropped tokens: the losses' scale must too, or their gradient shrinks by the dropped
    fraction. Per-token and ordinary runs then take the same step (equal token counts)."""
    settings = TinyGPTSettings(num_moe_experts=4, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.0,
                               extra_config={"moe_expert_capacity_factor": 1.0, "moe_token_drop_policy": "probs"})
    spec = SpecializationConfig(sp_coeff=0.5, cp_coeff=0.5, ortho_coeff=0.5, var_coeff=0.5)
    ref = run_distributed(train_step_result, 1, ParallelSizes(), args=(settings, spec_fn(spec)))[0]
    per_token = run_distributed(train_step_result, 1, ParallelSizes(),
                                args=(settings.replace(calculate_per_token_loss=True), spec_fn(spec)),
                                kwargs={"initial_params": ref["params"]})[0]
    assert_same_step(ref, per_token, rtol=1e-5)
