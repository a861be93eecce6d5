"""The losses on a HybridModel under every parallel layout equal one process (megatron-core >= 0.19).

A tiny HybridModel (``*`` attention, ``-`` dense MLP and ``E`` MoE layers, megatron's local modules
through ``core.hybrid``) with R_sp, R_cp, L_o, L_v and the metrics on takes one training step through
megatron's schedule, DDP and grad finalization. Under TP2+SP, EP2 with the alltoall and with the
allgather dispatcher, PP2 with a ``|`` between two ``E`` layers (R_cp's pair crosses the stage
boundary through ``core.stage_transport``), PP2xVPP2 (four ``|`` segments, every pair across a
model chunk), PP2xEP2 (4 ranks) and PP2 with full uniform and selective ``moe`` recomputation (the
cross-stage values travel in the first, no-grad pass only; the reference never recomputes), the LM loss, every gathered gradient, the per-layer value
of each loss in megatron's tracker and the routing metrics equal the one-process run's (rtol 1e-5,
the helpers of test_core_parity). In the same spawned run each loss alone (LM weight 0, load balancing
off) has the one-process gradient to 1e-5 of its own size.

Which stage builds which layer of a pattern (``stage_transport.hybrid_pipeline_segments``, used to
route R_cp's cross-stage pairs) is checked against megatron's own ``select_pipeline_segment``.
"""
import re
import types

import pytest
import torch

from megatron_moe_spec.core.version import megatron_core_version

if megatron_core_version().release[:2] < (0, 19):
    pytest.skip(f"HybridModel (megatron.core.models.hybrid) exists from megatron-core 0.19; this is "
                f"{megatron_core_version()} (run with the 0.19.2 environment: MMS_MEGATRON_CORE=0.19.2)",
                allow_module_level=True)

from megatron_moe_spec.core import stage_transport  # noqa: E402
from megatron_moe_spec.core.layer_specs import coupled_layers, cross_stage_pairs, moe_layer_numbers  # noqa: E402


# ----------------------------------------------------------------------------- pipeline ownership
class _FakeGroup:
    """What select_pipeline_segment asks of its process groups: rank and size (no collective)."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def _megatron_segment(monkeypatch, pattern, pp, rank, vp_stage, first=None, last=None):
    """megatron-core's own (layer types, offset) of (pipeline ``rank``, ``vp_stage``)."""
    from megatron.core.models.hybrid.hybrid_layer_allocation import parse_hybrid_pattern, select_pipeline_segment

    # group None: megatron's log_single_rank asks for the global rank (not 0: no deprecation log line)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1 if group is None else group.rank())
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: group.size())
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    quiet = _FakeGroup(1, 2)  # tp rank 1: megatron's per-stage log line stays silent
    layers, offset = select_pipeline_segment(parse_hybrid_pattern(pattern).main_pattern, _FakeGroup(rank, pp),
                                             vp_stage, first_stage_layers=first, last_stage_layers=last,
                                             tp_group=quiet, dp_cp_group=quiet)
    return "".join(layers), offset


OWNERSHIP = [
    # pattern, pp, vpp, first, last
    ("*E*E", 1, None, None, None),
    ("*E|*E", 2, None, None, None),
    ("*E-|E*E", 2, None, None, None),
    ("*E|*E|-E|*E", 2, 2, None, None),
    ("*E|E|*-E|E*|E-|*E", 3, 2, None, None),
    ("*E*E*E*E", 2, None, None, None),       # no '|': megatron's even split (deprecated by megatron)
    ("*E*E*E*E*E", 3, None, 3, 4),           # no '|': uneven first/last stage
    ("*E*E*E", 2, None, 2, None),
    ("*E*E*E*E", 3, None, None, 2),
    ("*E*E|*E/*E", 2, None, None, None),     # an MTP part after '/' is not in the main decoder
]


@pytest.mark.parametrize("pattern,pp,vpp,first,last", OWNERSHIP, ids=[o[0] + f"-pp{o[1]}v{o[2]}" for o in OWNERSHIP])
def test_hybrid_stage_ownership_matches_megatron(monkeypatch, pattern, pp, vpp, first, last):
    config = types.SimpleNamespace(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                                   num_layers_in_first_pipeline_stage=first,
                                   num_layers_in_last_pipeline_stage=last)
    rows = stage_transport.hybrid_pipeline_segments(config, pattern)
    main = pattern.split("/")[0].replace("|", "")
    assert sorted((r, v) for r, v, _, _ in rows) == [(r, v) for r in range(pp) for v in range(vpp or 1)]
    for rank, vp, offset, count in rows:
        layers, megatron_offset = _megatron_segment(monkeypatch, pattern, pp, rank, vp if vpp else None, first, last)
        assert (offset, main[offset:offset + count]) == (megatron_offset, layers), (rank, vp)
    owners = [stage_transport.pipeline_owner(config, n, hybrid_layer_pattern=pattern) for n in range(1, len(main) + 1)]
    for rank, vp, offset, count in rows:
        assert owners[offset:offset + count] == [(rank, vp)] * count


def test_hybrid_cross_stage_pairs_follow_the_segments():
    """R_cp pairs each E with the next E of the pattern; a pair crosses where a '|' lies between."""
    config = types.SimpleNamespace(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=None,
                                   num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None,
                                   moe_layer_freq=1, num_layers=8)
    pattern = "*E-E|*-E*E"
    assert moe_layer_numbers(config, pattern) == [2, 4, 7, 9]
    assert cross_stage_pairs(config, [2, 4, 7, 9], pattern) == [(4, 7)]
    assert coupled_layers(config, "exact", pattern) == [1, 3, 6]
    assert coupled_layers(config, "skip", pattern) == [1, 6]
    vpp2 = types.SimpleNamespace(**{**vars(config), "virtual_pipeline_model_parallel_size": 2})
    assert cross_stage_pairs(vpp2, [2, 4, 6, 8], "*E|*E|*E|*E") == [(2, 4), (4, 6), (6, 8)]


@pytest.mark.parametrize("pattern,pp,vpp,first,message", [
    ("*E|*E|*E", 2, None, None, "3 '|' pipeline segments"),
    ("*E|*E", 1, None, None, "2 '|' pipeline segments"),  # megatron would build only the first
    ("*E|*E", 1, 2, None, "2 '|' pipeline segments"),     # no interleaving without pipeline stages
    ("*E|*E|*E|*E", 2, None, None, "4 '|' pipeline segments"),  # ... or only the first two
    ("*E|*E", 2, None, 1, "num_layers_in_first_pipeline_stage"),
    ("*E*E", 2, 2, None, "no '|'"),
    ("*E*E*", 2, None, None, "do not split evenly"),
])
def test_hybrid_layouts_that_leave_layers_unbuilt_are_refused(pattern, pp, vpp, first, message):
    config = types.SimpleNamespace(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                                   num_layers_in_first_pipeline_stage=first,
                                   num_layers_in_last_pipeline_stage=None)
    with pytest.raises(ValueError, match=re.escape(message)):
        stage_transport.hybrid_pipeline_segments(config, pattern)


# ----------------------------------------------------------------------------- parity
import functools  # noqa: E402

from test_core_parity import assert_alone_grads_match, assert_close_metrics, assert_close_values  # noqa: E402

from megatron_moe_spec.core.hybrid import get_hybrid_stack_spec  # noqa: E402
from megatron_moe_spec.specialization_config import SpecializationConfig  # noqa: E402
from megatron_moe_spec.testing.compare import assert_same_step  # noqa: E402
from megatron_moe_spec.testing.distributed import ParallelSizes, run_distributed  # noqa: E402
from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, train_step_result  # noqa: E402

ALL_LOSSES = SpecializationConfig(sp_coeff=0.05, cp_coeff=0.05, ortho_coeff=0.05, var_coeff=0.05, metrics=True)
COEFFS = ("sp_coeff", "cp_coeff", "ortho_coeff", "var_coeff")
# Attention, MoE, dense MLP between two MoE layers (R_cp pairs across it), and a third MoE layer.
TINY = TinyGPTSettings(hidden_size=32, num_attention_heads=4, ffn_hidden_size=32, num_moe_experts=4,
                       moe_ffn_hidden_size=16, hybrid_layer_pattern="*E-E*E")
_REFERENCES = {}


def spec_fn(spec_config, pattern):
    return functools.partial(get_hybrid_stack_spec, spec_config=spec_config, hybrid_layer_pattern=pattern)


def each_loss_alone(spec_config, pattern):
    return {name: spec_fn(SpecializationConfig(**{name: getattr(spec_config, name)}), pattern)
            for name in COEFFS if getattr(spec_config, name)}


def reference(settings, spec_config, dp):
    """One process: the pattern without '|', the micro-batches of all ``dp`` ranks, and never
    recomputation (comparing with a recomputed reference could hide a shared mistake)."""
    pattern = settings.hybrid_layer_pattern.replace("|", "")
    single = settings.replace(num_microbatches=settings.num_microbatches * dp, hybrid_layer_pattern=pattern,
                              recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
                              recompute_modules=None)
    key = (repr(single), repr(spec_config))
    if key not in _REFERENCES:
        _REFERENCES[key] = run_distributed(train_step_result, 1, ParallelSizes(),
                                           args=(single, spec_fn(spec_config, pattern)),
                                           kwargs={"alone": each_loss_alone(spec_config, pattern)})[0]
    return _REFERENCES[key]


LAYOUTS = [
    # name, settings, world, parallel, dp of the dense part
    ("tp2_sp", TINY, 2, ParallelSizes(tp=2), 1),
    ("ep2_alltoall", TINY, 2, ParallelSizes(ep=2), 2),
    ("ep2_allgather", TINY.replace(moe_token_dispatcher_type="allgather"), 2, ParallelSizes(ep=2), 2),
    # '|' between the second and third E: R_cp's pair (layers 4, 6; 1-based) crosses the stages
    # through the side channel, under 1F1B with 4 micro-batches.
    ("pp2_cross_boundary", TINY.replace(hybrid_layer_pattern="*E-E|*E", num_microbatches=4), 2,
     ParallelSizes(pp=2), 1),
    # Interleaved 1F1B: four '|' segments on 2 stages x 2 model chunks; every E pair crosses a chunk
    # (rank 0 -> rank 1 -> rank 0 -> rank 1), one of them with a dense layer between.
    ("pp2_vpp2_interleaved", TINY.replace(hybrid_layer_pattern="*E|-E|*E|E", num_microbatches=4), 2,
     ParallelSizes(pp=2, vpp=2), 1),
    # PP2 x EP2 (4 ranks, DP2 of the dense part): the pair (2, 5) crosses the '|' while each stage's
    # MoE layers dispatch over their own EP group; the second stage also has a pair of its own (5, 7).
    ("pp2_ep2", TINY.replace(hybrid_layer_pattern="*E|-E*E", num_microbatches=4), 4, ParallelSizes(pp=2, ep=2), 2),
    # PP2 with recomputation: the first (no-grad) pass sends and receives R_cp's cross-stage values,
    # the recompute pass must not (the peers post each stream once per micro-batch). Layer 4 ends the
    # local pair (2, 4) and starts the pair (4, 6) across the '|'.
    ("pp2_full_recompute", TINY.replace(hybrid_layer_pattern="*E-E|*E", num_microbatches=4,
                                        recompute_granularity="full", recompute_method="uniform",
                                        recompute_num_layers=1), 2, ParallelSizes(pp=2), 1),
    ("pp2_moe_recompute", TINY.replace(hybrid_layer_pattern="*E-E|*E", num_microbatches=4,
                                       recompute_granularity="selective", recompute_modules=["moe"]), 2,
     ParallelSizes(pp=2), 1),
]


@pytest.mark.multirank
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name,settings,world,parallel,dp", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_hybrid_losses_match_one_process(name, settings, world, parallel, dp):
    spec = ALL_LOSSES
    pattern = settings.hybrid_layer_pattern
    ref = reference(settings, spec, dp)
    for loss in ("specialization_loss", "coupling_loss", "orthogonality_loss", "variance_loss"):
        assert any(v != 0 for v in ref["tracker"][loss]), f"{loss} was not logged"
    moe = moe_layer_numbers(None, pattern)
    # R_cp is logged under the first layer of each E pair, whatever lies between (0-based).
    assert [i for i, v in enumerate(ref["tracker"]["coupling_loss"]) if v != 0] == [n - 1 for n in moe[:-1]]
    assert set(ref["alone_grads"]) == set(COEFFS)
    for loss, grads in ref["alone_grads"].items():
        assert any(float(g.abs().max()) > 0 for g in grads.values()), f"{loss} alone has no gradient"
        assert all(float(g.abs().max()) == 0 for k, g in grads.items() if k.startswith("output_layer")), loss

    results = run_distributed(train_step_result, world, parallel, args=(settings, spec_fn(spec, pattern)),
                              kwargs={"initial_params": ref["params"], "alone": each_loss_alone(spec, pattern)})
    # Under PP the '|' splits an R_cp pair: the side channel carries it (cp_pipeline: exact).
    assert bool(cross_stage_pairs(_pp_config(parallel), moe, pattern)) == (parallel.pp > 1)
    for rank, result in enumerate(results):
        assert_same_step(ref, result, rtol=1e-5)
        assert_alone_grads_match(ref, result, rank)
        assert_close_values(ref["tracker"], result["tracker"], f"rank {rank} tracker")
        # Every metric, the pathway of the pair across stages included (its routing travels with R_cp's).
        assert_close_metrics(ref["metrics"], result["metrics"])
        assert any(k.startswith("pathway_nmi/layer_") for k in result["metrics"])


def _pp_config(parallel):
    return types.SimpleNamespace(pipeline_model_parallel_size=parallel.pp,
                                 virtual_pipeline_model_parallel_size=parallel.vpp,
                                 num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None)
