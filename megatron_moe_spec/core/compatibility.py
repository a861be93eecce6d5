"""Exact or refused: what each megatron-core option does to the specialization losses and metrics.

The rule (issue 10): with any loss or the metrics on, every ``TransformerConfig`` option that touches
the MoE layer, the router, the dispatcher, recomputation, precision, context parallelism or
multi-token prediction is either

- **exact**: tested against a one-process or no-option reference (the test is named), or
- **refused** when the spec is built (:func:`check_compatibility`), with one line that names the
  option and the fix, or
- **no interaction**: the option cannot change what the losses see (the reason is written).

GPU-only paths are refused until a GPU test exists. With every coefficient 0 and the metrics off
nothing is refused: off means stock megatron-core.

:data:`OPTIONS` is the one source of truth: ``docs/compatibility.md`` is generated from it
(``python -m megatron_moe_spec.core.compatibility > docs/compatibility.md``) and
``tests/test_compatibility.py`` checks that the doc, this table, the refusals raised by
:func:`check_compatibility` and the installed ``TransformerConfig``'s fields all agree.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Dict

logger = logging.getLogger(__name__)

EXACT = "exact"
REFUSED = "refused"
NO_INTERACTION = "no interaction"

GPU_TEST = ("tests/test_gpu.py::test_captured_z_equals_independent_swiglu[TEGroupedMLP-cuda] (runs only with "
            "CUDA and Transformer Engine; not yet run on a GPU, docs/gpu.md)")
"""The GPU test of the TEGroupedMLP capture."""

FIELD_FILTER = re.compile(
    r"moe|expert|router|recompute|fp8|fp4|quant|context_parallel|cp_comm|mtp|overlap|cuda_graph|"
    r"offload|op_fuser|grouped_gemm|deepep|hybridep|delay_wgrad"
)
"""Names of ``TransformerConfig`` fields that concern MoE, recompute, precision, CP, MTP or overlap:
each such field of the installed megatron-core must have a row in :data:`OPTIONS`."""


@dataclass(frozen=True)
class Option:
    status: str
    """exact, refused or no interaction."""
    detail: str
    """exact: the test(s); refused: when; no interaction: why."""
    message: str = ""
    """The one-line ``ValueError`` text :func:`check_compatibility` raises (refused, or an exact option
    with refused values)."""
    versions: str = "0.16 0.19"
    """Where the field exists among the tested ends: "0.16", "0.19", "0.16 0.19", or "main" (neither)."""


_OFF = "turn the specialization losses and metrics off"
_ONLY_WITH = "only read when {} is on, which is refused"


def _fix(option: str, fix: str, why: str) -> str:
    return f"{option} is not supported with the specialization losses or metrics ({why}): {fix}, or {_OFF}"


def _only_with(name: str, versions: str = "0.16 0.19") -> Option:
    return Option(NO_INTERACTION, _ONLY_WITH.format(name), versions=versions)


_INFERENCE = "inference only; the losses and metrics are computed in training"
_MEGATRON_LOSS = "megatron's own loss on the router, attached beside ours and not read by them"

OPTIONS: Dict[str, Option] = {
    # ------------------------------------------------------------------ the MoE layer
    "num_moe_experts": Option(
        EXACT, "tests/test_core_independent.py::test_each_loss_alone_matches_independent_gradient",
        "num_moe_experts is None: the specialization losses and metrics need an MoE model: set num_moe_experts"),
    "moe_router_topk": Option(
        EXACT, "tests/test_core_independent.py::test_each_loss_alone_matches_independent_gradient "
        "(k=2, k=4 in tests/test_core_parity.py deepseek layouts); k=1 gives R_sp = L_o = 0 with a warning"),
    "moe_ffn_hidden_size": Option(EXACT, "tests/test_core_independent.py, tests/test_core_parity.py"),
    "moe_layer_freq": Option(
        EXACT, "tests/test_core_parity.py::test_losses_match_one_process[deepseek_tp2_sp] (dense first layer); "
        "refused for R_cp with fewer than two MoE layers (a HybridModel: fewer than two 'E' in "
        "hybrid_layer_pattern, with its own message naming the pattern)",
        "specialization.cp_coeff > 0 (R_cp) couples adjacent MoE layers and this model has fewer than two "
        "MoE layers (num_layers / moe_layer_freq): add MoE layers or set cp_coeff to 0"),
    "moe_shared_expert_intermediate_size": Option(
        EXACT, "tests/test_core_parity.py::test_losses_match_one_process[deepseek_*]"),
    "moe_shared_expert_gate": Option(
        NO_INTERACTION, "gates the shared expert's output; shared experts are not captured (only routed "
        "experts enter R_sp / L_o) and the router is not touched"),
    "moe_shared_expert_overlap": Option(
        EXACT, "megatron-core < 0.18: tests/test_compatibility.py::test_shared_expert_overlap_before_0_18_"
        "matches_one_process_without_it; refused on >= 0.18 with the alltoall dispatcher when R_sp, L_o or "
        "the metrics are on",
        _fix("moe_shared_expert_overlap", "set moe_shared_expert_overlap to false",
             "from megatron-core 0.18 the alltoall dispatcher's token_combine runs the shared expert, so "
             "the extra combine of the R_sp / L_o / metrics exchange breaks its overlap state")),
    "moe_shared_expert_glu_interleave_size": Option(
        NO_INTERACTION, "layout of the shared expert's GLU; shared experts are not captured", versions="0.19"),
    "use_grouped_gemm_for_shared_expert": Option(
        NO_INTERACTION, "how the shared expert is computed; shared experts are not captured", versions="0.19"),
    "use_grouped_gemm_for_dense_mlp": Option(
        NO_INTERACTION, "dense (non-MoE) MLP layers only", versions="0.19"),
    "moe_grouped_gemm": Option(
        EXACT, f"GPU only (TEGroupedMLP): {GPU_TEST}; legacy GroupedMLP refused "
        "(moe_use_legacy_grouped_gemm)"),
    "moe_use_legacy_grouped_gemm": Option(
        REFUSED, "with moe_grouped_gemm when R_sp, L_o or the metrics are on",
        "moe_use_legacy_grouped_gemm: megatron's legacy GroupedMLP has no linear_fc2 module to capture the "
        "SwiGLU intermediate from: set moe_use_legacy_grouped_gemm to false (TEGroupedMLP)", versions="0.16"),
    "moe_mlp_glu_interleave_size": Option(
        NO_INTERACTION, "rearranges fc1's output inside TE's grouped MLP; the capture reads fc2's input, "
        "after the activation, which the layout does not change", versions="0.19"),
    "moe_single_grouped_weight": Option(
        REFUSED, "when any loss or the metrics are on (GPU only: Transformer Engine GroupedTensor)",
        _fix("moe_single_grouped_weight", "set moe_single_grouped_weight to false",
             "Transformer Engine GroupedTensor weights, GPU only and untested with the losses"),
        versions="0.19"),
    "moe_single_grouped_bias": Option(
        REFUSED, "when any loss or the metrics are on (GPU only: Transformer Engine GroupedTensor)",
        _fix("moe_single_grouped_bias", "set moe_single_grouped_bias to false",
             "Transformer Engine GroupedTensor biases, GPU only and untested with the losses"),
        versions="0.19"),
    "moe_use_grouped_tensor": Option(
        REFUSED, "when any loss or the metrics are on (pads expert segments, GPU only)",
        _fix("moe_use_grouped_tensor", "set moe_use_grouped_tensor to false",
             "it pads each expert's rows, so fc2's input no longer matches the gates; GPU only"),
        versions="main"),
    "use_transformer_engine_op_fuser": Option(
        REFUSED, "when any loss or the metrics are on (0.18+, GPU only)",
        _fix("use_transformer_engine_op_fuser", "set use_transformer_engine_op_fuser to false",
             "the fused TE path never calls a linear_fc2 module, so the SwiGLU intermediate cannot be "
             "captured; GPU only"),
        versions="0.19"),
    "moe_apply_probs_on_input": Option(
        REFUSED, "when R_sp, L_o or the metrics are on",
        _fix("moe_apply_probs_on_input", "set moe_apply_probs_on_input to false",
             "the gate then scales the expert input, not fc2's input, so the captured rows are not g*z"),
    ),
    "moe_latent_size": Option(
        REFUSED, "when R_sp, L_o or the metrics are on (untested)",
        _fix("moe_latent_size", "set moe_latent_size to None",
             "latent MoE projections are untested with the expert-activation exchange")),
    "moe_paged_stash": Option(
        REFUSED, "when any loss or the metrics are on (untested)",
        _fix("moe_paged_stash", "set moe_paged_stash to false",
             "it moves the routed experts' saved activations into a paged stash, untested with the capture"),
        versions="0.19"),
    "moe_paged_stash_page_size": _only_with("moe_paged_stash", "0.19"),
    "moe_paged_stash_buffer_size_factor_cpu": _only_with("moe_paged_stash", "0.19"),
    "moe_paged_stash_buffer_size_factor_cuda": _only_with("moe_paged_stash", "0.19"),
    "moe_extended_tp": Option(NO_INTERACTION, "deprecated and ignored by megatron-core", versions="0.16"),
    "moe_per_layer_logging": Option(NO_INTERACTION, "logging of megatron's own losses only"),
    "moe_token_dropping": Option(NO_INTERACTION, "documented by megatron-core as unsupported and unused"),
    # ------------------------------------------------------------------ router
    "moe_router_score_function": Option(
        EXACT, "softmax: tests/test_core_independent.py::test_each_loss_alone_matches_independent_"
        "gradient; sigmoid: tests/test_core_independent.py::test_variants_match_independent_computation"
        "[sigmoid_router]; other score functions (sqrtsoftplus, 0.18+) refused",
        "moe_router_score_function: only softmax and sigmoid are tested with the specialization losses "
        "and metrics: set moe_router_score_function to softmax or sigmoid, or " + _OFF),
    "moe_router_pre_softmax": Option(
        NO_INTERACTION, "changes the gates megatron returns, which the record takes as they are (ungate "
        "divides the gate the experts multiplied; L_v's paper form is defined on these gates); p is "
        "recomputed from the logits (softmax over all experts) either way"),
    "moe_router_topk_scaling_factor": Option(
        NO_INTERACTION, "scales the gates; the experts multiply the scaled gate and ungate divides the same "
        "gate out, p comes from the logits, and L_v (paper form) is defined on the gates megatron "
        "returns, scaling included"),
    "moe_router_num_groups": Option(
        EXACT, "tests/test_core_independent.py::test_variants_match_independent_computation[group_limited_topk]"),
    "moe_router_group_topk": Option(
        EXACT, "tests/test_core_independent.py::test_variants_match_independent_computation[group_limited_topk]"),
    "moe_router_topk_limited_devices": Option(
        NO_INTERACTION, "deprecated alias megatron-core turns into moe_router_num_groups (exact)"),
    "moe_router_enable_expert_bias": Option(
        EXACT, "tests/test_core_independent.py::test_variants_match_independent_computation[sigmoid_expert_bias]"),
    "moe_router_bias_update_rate": Option(
        NO_INTERACTION, "the expert bias is updated between steps, outside the forward the losses see; "
        "the forward with a bias is exact (moe_router_enable_expert_bias)"),
    "moe_router_dtype": Option(
        NO_INTERACTION, "the dtype of megatron's routing; the record casts the logits to fp32 "
        "(routing_record.pre_topk_distribution) and ungate divides in fp32"),
    "moe_router_load_balancing_type": Option(
        EXACT, "aux_loss: tests/test_core_parity.py; seq_aux_loss, global_aux_loss and none add or drop "
        "megatron's own loss only; sinkhorn and quantile_balancing (0.19) change the routing and are "
        "refused",
        "moe_router_load_balancing_type: sinkhorn and quantile_balancing routing are untested with the "
        "specialization losses and metrics: set moe_router_load_balancing_type to aux_loss, seq_aux_loss, "
        "global_aux_loss or none, or " + _OFF),
    "moe_router_quantile_balancing_ema": _only_with("moe_router_load_balancing_type quantile_balancing", "0.19"),
    "moe_aux_loss_coeff": Option(NO_INTERACTION, _MEGATRON_LOSS),
    "moe_z_loss_coeff": Option(NO_INTERACTION, _MEGATRON_LOSS),
    "moe_input_jitter_eps": Option(
        NO_INTERACTION, "jitters the router input before the logits; the record is taken from those logits"),
    "moe_router_force_load_balancing": Option(
        REFUSED, "when any loss or the metrics are on",
        _fix("moe_router_force_load_balancing", "set moe_router_force_load_balancing to false",
             "a benchmark mode that routes on random logits, so the losses would train nothing")),
    "moe_router_force_biased": Option(
        REFUSED, "when any loss or the metrics are on (not None)",
        _fix("moe_router_force_biased", "set moe_router_force_biased to None",
             "a benchmark mode that adds random bias to the logits; untested"), versions="0.19"),
    "moe_enable_routing_replay": Option(
        REFUSED, "when any loss or the metrics are on",
        _fix("moe_enable_routing_replay", "set moe_enable_routing_replay to false",
             "replayed routing is untested with the routing record")),
    "moe_router_fusion": Option(
        REFUSED, "when any loss or the metrics are on (GPU only)",
        _fix("moe_router_fusion", "set moe_router_fusion to false",
             "Transformer Engine's fused routing, GPU only and untested")),
    "moe_router_padding_for_quantization": Option(
        REFUSED, "when any loss or the metrics are on",
        _fix("moe_router_padding_for_quantization", "set moe_router_padding_for_quantization to false",
             "padded routing maps corrupt the valid tokens and the gates the losses divide by; GPU only")),
    "moe_router_padding_for_fp8": Option(
        REFUSED, "when any loss or the metrics are on (alias of moe_router_padding_for_quantization)",
        _fix("moe_router_padding_for_fp8", "set moe_router_padding_for_fp8 to false",
             "padded routing maps corrupt the valid tokens and the gates the losses divide by; GPU only")),
    # ------------------------------------------------------------------ capacity and dispatch
    "moe_expert_capacity_factor": Option(
        EXACT, "tests/test_core_independent.py::test_variants_match_independent_computation[capacity_dropping]"),
    "moe_token_drop_policy": Option(
        EXACT, "probs: tests/test_core_independent.py::test_variants_match_independent_computation"
        "[capacity_dropping]; position (untested) only changes which tokens the same routing map drops"),
    "moe_pad_expert_input_to_capacity": Option(
        REFUSED, "when any loss or the metrics are on, with either dispatcher",
        _fix("moe_pad_expert_input_to_capacity", "set moe_pad_expert_input_to_capacity to false "
             "(capacity dropping without padding is exact)",
             "padded entries in the routing map corrupt the valid tokens and top-k of R_cp and L_v, and "
             "the allgather exchange fails on them")),
    "moe_expert_rank_capacity_factor": _only_with("the flex dispatcher (hybridep / ncclep)", "0.19"),
    "moe_token_dispatcher_type": Option(
        EXACT, "alltoall and allgather: tests/test_core_parity.py::test_losses_match_one_process[ep2_alltoall, "
        "ep2_allgather]; flex refused",
        "moe_token_dispatcher_type flex (DeepEP / HybridEP, GPU only) is not supported with the "
        "specialization losses or metrics: set moe_token_dispatcher_type to alltoall or allgather, or " + _OFF),
    "moe_enable_deepep": Option(
        REFUSED, "when any loss or the metrics are on (selects the flex dispatcher)",
        _fix("moe_enable_deepep", "set moe_enable_deepep to false and moe_token_dispatcher_type to "
             "alltoall or allgather", "DeepEP is the flex dispatcher, GPU only")),
    "moe_flex_dispatcher_backend": _only_with("the flex dispatcher"),
    "moe_deepep_num_sms": _only_with("the flex dispatcher"),
    "moe_hybridep_num_sms": _only_with("the flex dispatcher"),
    "moe_hybridep_num_sms_preprocessing": _only_with("the flex dispatcher", "0.19"),
    "moe_hybridep_num_blocks_permute": _only_with("the flex dispatcher", "0.19"),
    "moe_hybridep_num_blocks_unpermute": _only_with("the flex dispatcher", "0.19"),
    "moe_hybridep_pad_uneven_dispatch_inputs": _only_with("the flex dispatcher", "0.19"),
    "moe_permute_fusion_into_hybridep": _only_with("the flex dispatcher", "0.19"),
    "moe_flex_dispatcher_num_sms": _only_with("the flex dispatcher", "0.19"),
    "moe_ncclep_static_shape": _only_with("the flex dispatcher (ncclep)", "0.19"),
    "moe_ncclep_zero_copy": _only_with("the flex dispatcher (ncclep)", "0.19"),
    "moe_permute_fusion": Option(
        REFUSED, "when R_sp, L_o or the metrics are on (GPU only)",
        _fix("moe_permute_fusion", "set moe_permute_fusion to false",
             "Transformer Engine's fused permutation, GPU only and untested with the exchange")),
    # ------------------------------------------------------------------ parallelism
    "expert_model_parallel_size": Option(
        EXACT, "tests/test_core_parity.py::test_losses_match_one_process[ep2_alltoall, ep2_allgather, tp2_ep2]"),
    "expert_tensor_parallel_size": Option(
        EXACT, "tests/test_core_parity.py::test_losses_match_one_process[ep2_etp2_alltoall, ep2_etp2_allgather]"),
    "expert_tensor_parallel_num_weight_shards": Option(
        NO_INTERACTION, "resolved by megatron-core into expert_tensor_parallel_size and "
        "expert_gtp_weight_remat_size, which are classified", versions="0.19"),
    "expert_gtp_weight_remat_size": Option(
        REFUSED, "when any loss or the metrics are on (> 1)",
        _fix("expert_gtp_weight_remat_size", "set expert_gtp_weight_remat_size to 1",
             "generalized tensor parallelism of the experts is untested with the losses"), versions="0.19"),
    "context_parallel_size": Option(
        REFUSED, "when any loss or the metrics are on (> 1)",
        _fix("context_parallel_size", "set context_parallel_size to 1",
             "context-parallel attention needs Transformer Engine on GPU and the per-token CP weighting of "
             "the losses is untested: refused until a GPU test exists")),
    "cp_comm_type": _only_with("context parallelism"),
    "hierarchical_context_parallel_sizes": _only_with("context parallelism"),
    "hybrid_context_parallel": Option(
        REFUSED, "when any loss or the metrics are on",
        _fix("hybrid_context_parallel", "set hybrid_context_parallel to false",
             "context parallelism is refused: GPU only and untested")),
    "overlap_moe_expert_parallel_comm": Option(
        REFUSED, "when any loss or the metrics are on",
        _fix("overlap_moe_expert_parallel_comm", "set overlap_moe_expert_parallel_comm to false",
             "its schedule runs the layers without TransformerLayer.forward, so R_cp gets no pairs; GPU only")),
    "ep_overlap_early_attn_memory_release": _only_with("overlap_moe_expert_parallel_comm"),
    "delay_wgrad_compute": Option(
        REFUSED, "when any loss or the metrics are on",
        _fix("delay_wgrad_compute", "set delay_wgrad_compute to false",
             "Transformer Engine's delayed weight gradients, GPU only and untested with the losses")),
    "overlap_dispatch_backward_with_experts_wgrad": Option(
        REFUSED, "when any loss or the metrics are on (0.18+)",
        _fix("overlap_dispatch_backward_with_experts_wgrad",
             "set overlap_dispatch_backward_with_experts_wgrad to false",
             "it overlaps CUDA streams, GPU only and untested with the losses"), versions="0.19"),
    "overlap_p2p_comm": Option(
        NO_INTERACTION, "overlaps the pipeline's send/recv of hidden states; R_cp pairs across stages are "
        "skipped anyway and the losses live inside a stage"),
    "overlap_p2p_comm_warmup_flush": _only_with("overlap_p2p_comm (no interaction)"),
    "tp_comm_overlap": Option(
        NO_INTERACTION, "overlaps TP communication inside Transformer Engine linear layers with the same "
        "values; the exchange uses the MoE dispatcher's own communication"),
    "tp_comm_overlap_ag": _only_with("tp_comm_overlap (no interaction)"),
    "tp_comm_overlap_rs": _only_with("tp_comm_overlap (no interaction)"),
    "tp_comm_overlap_rs_dgrad": _only_with("tp_comm_overlap (no interaction)"),
    "tp_comm_overlap_disable_qkv": _only_with("tp_comm_overlap (no interaction)"),
    "tp_comm_overlap_disable_fc1": _only_with("tp_comm_overlap (no interaction)"),
    # ------------------------------------------------------------------ recomputation and offloading
    "recompute_granularity": Option(
        EXACT, "full: tests/test_core_parity.py::test_losses_match_one_process[full_recompute_ep2, "
        "full_recompute_2_layers_dp2]; selective: see recompute_modules; R_cp's recompute queues: "
        "tests/test_core_options.py::test_under_recomputation_only_one_pass_exchanges, "
        "test_a_stray_no_grad_forward_is_refused_not_mispaired, "
        "test_begin_step_drops_stray_entries_and_the_gradient_is_exact; HybridModel: "
        "tests/test_hybrid_parity.py::test_hybrid_losses_match_one_process[pp2_full_recompute]"),
    "recompute_method": Option(
        EXACT, "uniform: tests/test_core_parity.py[full_recompute_*]; block refused for R_cp",
        "recompute_method block: R_cp with full recomputation needs every layer recomputed alike, and a "
        "pair across the recomputed / not recomputed boundary cannot be split: set recompute_method to "
        "uniform, or cp_coeff to 0"),
    "recompute_num_layers": Option(
        EXACT, "tests/test_core_parity.py::test_losses_match_one_process[full_recompute_ep2 (1), "
        "full_recompute_2_layers_dp2 (2)]"),
    "recompute_modules": Option(
        EXACT, "moe: tests/test_core_parity.py::test_losses_match_one_process[moe_recompute_tp2, "
        "moe_recompute_pp2_1f1b], HybridModel: tests/test_hybrid_parity.py::test_hybrid_losses_match_one_process["
        "pp2_moe_recompute]; core_attn, layernorm, mla_up_proj, mlp, shared_experts recompute modules "
        "the losses do not read; moe_act refused when R_sp, L_o or the metrics are on",
        _fix("recompute_modules moe_act", "remove moe_act from recompute_modules (moe recomputes the whole "
             "MoE layer and is exact)", "the activation checkpoint frees fc2's input before the losses "
             "read it")),
    "moe_layer_recompute": Option(
        NO_INTERACTION, "deprecated alias megatron-core turns into recompute_modules [moe] (exact)"),
    "cpu_offloading": Option(
        REFUSED, "when any loss or the metrics are on",
        _fix("cpu_offloading", "set cpu_offloading to false",
             "activation offloading is GPU only and untested with the captured tensors")),
    "cpu_offloading_activations": _only_with("cpu_offloading"),
    "cpu_offloading_weights": _only_with("cpu_offloading"),
    "cpu_offloading_num_layers": _only_with("cpu_offloading"),
    "cpu_offloading_double_buffering": _only_with("cpu_offloading"),
    "cpu_offloading_retain_pinned_cpu_buffers": _only_with("cpu_offloading", "0.19"),
    "_cpu_offloading_context": _only_with("cpu_offloading (megatron-internal)"),
    "fine_grained_activation_offloading": Option(
        REFUSED, "when any loss or the metrics are on",
        _fix("fine_grained_activation_offloading", "set fine_grained_activation_offloading to false",
             "activation offloading is GPU only and untested with the captured tensors")),
    "offload_modules": _only_with("fine_grained_activation_offloading"),
    "min_offloaded_tensor_size": _only_with("fine_grained_activation_offloading"),
    "activation_offload_fraction": _only_with("fine_grained_activation_offloading", "0.19"),
    "fine_grained_offloading_max_inflight_offloads": _only_with("fine_grained_activation_offloading", "0.19"),
    "delay_offload_until_cuda_graph": _only_with("fine_grained_activation_offloading", "0.19"),
    "delta_offload_bytes_across_pp_ranks": _only_with("fine_grained_activation_offloading", "0.19"),
    # ------------------------------------------------------------------ precision
    "fp8": Option(
        REFUSED, "when any loss or the metrics are on",
        _fix("fp8", "set fp8 to None", "fp8 pads each expert's fc2 input while the gates stay unpadded, "
             "and runs only on GPU")),
    "fp4": Option(
        REFUSED, "when any loss or the metrics are on",
        _fix("fp4", "set fp4 to None", "fp4 pads each expert's fc2 input while the gates stay unpadded, "
             "and runs only on GPU")),
    "quant_recipe": Option(
        REFUSED, "when any loss or the metrics are on (not None)",
        _fix("quant_recipe", "set quant_recipe to None", "per-module quantization is GPU only and untested")),
    "activation_func_fp8_input_store": Option(
        REFUSED, "when any loss or the metrics are on",
        _fix("activation_func_fp8_input_store", "set activation_func_fp8_input_store to false",
             "it stores the expert activation's input in fp8 for the backward of R_sp / L_o; untested")),
    **{name: _only_with("fp8") for name in (
        "fp8_recipe", "fp8_param", "fp8_margin", "fp8_interval", "fp8_amax_history_len",
        "fp8_amax_compute_algo", "fp8_wgrad", "fp8_dot_product_attention", "fp8_multi_head_attention",
        "fp8_quantizer_factory")},
    "fp8_output_proj": _only_with("fp8", "0.19"),
    **{name: _only_with("fp4") for name in ("fp4_recipe", "fp4_param", "fp4_quantizer_factory")},
    # ------------------------------------------------------------------ CUDA graphs
    "cuda_graph_impl": Option(
        REFUSED, "when any loss or the metrics are on (not none)",
        _fix("cuda_graph_impl", "set cuda_graph_impl to none", "CUDA graphs replay no Python side effects, "
             "so the routing records the losses need would go missing")),
    "enable_cuda_graph": Option(
        REFUSED, "when any loss or the metrics are on (deprecated alias of cuda_graph_impl local)",
        _fix("enable_cuda_graph", "set enable_cuda_graph to false", "CUDA graphs replay no Python side "
             "effects, so the routing records the losses need would go missing")),
    "external_cuda_graph": Option(
        REFUSED, "when any loss or the metrics are on (deprecated alias of cuda_graph_impl)",
        _fix("external_cuda_graph", "set external_cuda_graph to false", "CUDA graphs replay no Python side "
             "effects, so the routing records the losses need would go missing")),
    "cuda_graph_scope": _only_with("CUDA graphs"),
    "cuda_graph_modules": _only_with("CUDA graphs", "0.19"),
    "cuda_graph_warmup_steps": _only_with("CUDA graphs"),
    "cuda_graph_use_single_mempool": _only_with("CUDA graphs"),
    "cuda_graph_retain_backward_graph": _only_with("CUDA graphs"),
    "inference_cuda_graph_scope": Option(NO_INTERACTION, _INFERENCE, versions="0.19"),
    "inference_grouped_gemm_backend": Option(NO_INTERACTION, _INFERENCE, versions="0.19"),
    "inference_moe_disable_fused_quant_kernels": Option(NO_INTERACTION, _INFERENCE, versions="0.19"),
    "inference_moe_token_dispatcher_type": Option(NO_INTERACTION, _INFERENCE, versions="0.19"),
    "moe_pad_experts_for_cuda_graph_inference": Option(NO_INTERACTION, _INFERENCE, versions="0.19"),
    # ------------------------------------------------------------------ multi-token prediction
    "mtp_num_layers": Option(
        REFUSED, "when any loss or the metrics are on (not None / > 0)",
        _fix("mtp_num_layers", "set mtp_num_layers to None",
             "MTP's MoE layers would get R_sp / L_o / L_v without an R_cp pair or metrics, and from "
             "megatron-core 0.17 their layer numbers collide with the decoder's")),
    "mtp_loss_scaling_factor": _only_with("MTP (mtp_num_layers)"),
    "mtp_standalone": _only_with("MTP (mtp_num_layers)"),
    "mtp_detach_heads": _only_with("MTP (mtp_num_layers)", "0.19"),
    "mtp_use_repeated_layer": _only_with("MTP (mtp_num_layers)", "0.19"),
    "mtp_hybrid_override_pattern": _only_with("MTP (mtp_num_layers)", "0.19"),
    "mtp_grad_scale_func": _only_with("MTP (mtp_num_layers)", "0.19"),
    "moe_grad_scale_func": Option(
        NO_INTERACTION, "the backward scale of megatron's MoE aux losses; ours ride on megatron's "
        "MoEAuxLossAutoScaler and get the same scale (per-token scaling: see calculate_per_token_loss)",
        versions="0.19"),
    # ------------------------------------------------------------------ beyond the name filter
    "gated_linear_unit": Option(
        EXACT, "tests/test_core_independent.py (SwiGLU); refused without it for R_sp",
        "gated_linear_unit is false: specialization.sp_coeff > 0 needs a gated (SwiGLU) expert "
        "activation: set gated_linear_unit=True (--swiglu), or set sp_coeff to 0"),
    "calculate_per_token_loss": Option(
        EXACT, "tests/test_core_parity.py::test_losses_match_one_process[per_token_loss_tp2_ep2, "
        "per_token_loss_dp2_microbatches2], tests/test_core_options.py::test_per_token_loss_counts_capacity_"
        "dropped_tokens; with CP refused (context_parallel_size)"),
    "pipeline_model_parallel_size": Option(
        EXACT, "tests/test_core_parity.py::test_losses_match_one_process[pp2_1f1b, pp2_dense_first_stage]; "
        "R_cp pairs across stages: tests/test_cp_pipeline.py::test_cross_stage_coupling_matches_one_process "
        "(specialization cp_pipeline: exact; skip leaves them out with a start-up warning)"),
    "virtual_pipeline_model_parallel_size": Option(
        EXACT, "tests/test_core_parity.py::test_losses_match_one_process[pp2_vpp2_interleaved]; R_cp across "
        "model chunks: tests/test_cp_pipeline.py::test_cross_stage_coupling_matches_one_process"),
    "sequence_parallel": Option(EXACT, "tests/test_core_parity.py::test_losses_match_one_process[tp2_sp]"),
    "tensor_model_parallel_size": Option(
        EXACT, "tests/test_core_parity.py::test_losses_match_one_process[tp2_sp, tp2_ep2]"),
}

def refusal(option: str) -> ValueError:
    """The ``ValueError`` for a refused ``option``: its one-line message from :data:`OPTIONS`."""
    return ValueError(OPTIONS[option].message)


def _on(config, name: str) -> bool:
    """``config.name`` is set (truthy); a field this megatron-core version lacks is off."""
    return bool(getattr(config, name, None))


def hybrid_coupling_refusal(pattern: str, moe_layer_count: int) -> str:
    """The one-line refusal of R_cp on a HybridModel whose pattern has fewer than two ``E`` layers
    (the GPT message's ``num_layers / moe_layer_freq`` do not place a hybrid model's MoE layers)."""
    return (f"specialization.cp_coeff > 0 (R_cp) couples each MoE layer with the next and "
            f"hybrid_layer_pattern {pattern!r} has {moe_layer_count} 'E' (MoE) layer"
            f"{'' if moe_layer_count == 1 else 's'}: put at least two 'E' in the pattern (e.g. "
            f"'*E*E') or set cp_coeff to 0")


def check_compatibility(config, spec_config, hybrid_layer_pattern=None) -> None:
    """Refuse, with the fix, what the losses cannot serve exactly; note the harmless cases once.

    ``config``: megatron-core's ``TransformerConfig`` (fields a version lacks count as off);
    ``spec_config``: a ``SpecializationConfig``. Raises ``ValueError`` with the one-line message of
    the refused option's row in :data:`OPTIONS`. Off (no loss, no metrics) refuses nothing.
    ``hybrid_layer_pattern``: a HybridModel's pattern (its ``E`` layers are the MoE layers).
    """
    if not spec_config.enabled:
        return
    from megatron_moe_spec.core.layer_specs import moe_layer_numbers, warn_cross_stage_pairs
    from megatron_moe_spec.core.version import megatron_core_version

    needs_z = spec_config.needs_expert_activations  # R_sp, L_o, metrics: fc2 input captured, exchanged
    if config.num_moe_experts is None:
        raise refusal("num_moe_experts")
    if spec_config.sp_coeff > 0 and not config.gated_linear_unit:
        raise refusal("gated_linear_unit")

    # GPU-only and untested paths: refused whenever anything is on.
    for name in ("fp8", "fp4", "quant_recipe", "activation_func_fp8_input_store",
                 "moe_router_padding_for_quantization", "moe_router_padding_for_fp8",
                 "moe_pad_expert_input_to_capacity", "overlap_moe_expert_parallel_comm",
                 "overlap_dispatch_backward_with_experts_wgrad", "delay_wgrad_compute",
                 "use_transformer_engine_op_fuser", "moe_use_grouped_tensor", "moe_single_grouped_weight",
                 "moe_single_grouped_bias", "moe_paged_stash", "moe_router_fusion",
                 "moe_router_force_load_balancing", "moe_router_force_biased", "moe_enable_routing_replay",
                 "moe_enable_deepep", "mtp_num_layers", "hybrid_context_parallel", "cpu_offloading",
                 "fine_grained_activation_offloading", "enable_cuda_graph", "external_cuda_graph"):
        if _on(config, name):
            raise refusal(name)
    if getattr(config, "cuda_graph_impl", "none") not in (None, "none"):
        raise refusal("cuda_graph_impl")
    if (getattr(config, "context_parallel_size", 1) or 1) > 1:
        raise refusal("context_parallel_size")
    if (getattr(config, "expert_gtp_weight_remat_size", 1) or 1) > 1:
        raise refusal("expert_gtp_weight_remat_size")
    if config.moe_token_dispatcher_type == "flex":
        raise refusal("moe_token_dispatcher_type")
    if config.moe_router_score_function not in ("softmax", "sigmoid"):
        raise refusal("moe_router_score_function")
    balancing = config.moe_router_load_balancing_type
    for kind in balancing if isinstance(balancing, (list, tuple)) else [balancing]:
        if kind in ("sinkhorn", "quantile_balancing"):
            raise refusal("moe_router_load_balancing_type")

    # Paths that capture fc2's input (R_sp, L_o, the metrics).
    if needs_z:
        if config.moe_grouped_gemm and _on(config, "moe_use_legacy_grouped_gemm"):
            raise refusal("moe_use_legacy_grouped_gemm")
        for name in ("moe_apply_probs_on_input", "moe_latent_size", "moe_permute_fusion"):
            if _on(config, name):
                raise refusal(name)
        if "moe_act" in (getattr(config, "recompute_modules", None) or []) and \
                config.recompute_granularity == "selective":
            raise refusal("recompute_modules")
        if (config.moe_shared_expert_overlap and config.moe_token_dispatcher_type == "alltoall"
                and megatron_core_version().release[:2] >= (0, 18)):
            raise refusal("moe_shared_expert_overlap")

    if spec_config.cp_coeff > 0:
        moe_layers = moe_layer_numbers(config, hybrid_layer_pattern)
        if len(moe_layers) < 2:
            if hybrid_layer_pattern is not None:
                raise ValueError(hybrid_coupling_refusal(hybrid_layer_pattern, len(moe_layers)))
            raise refusal("moe_layer_freq")
        if config.recompute_granularity == "full" and config.recompute_method != "uniform":
            raise refusal("recompute_method")
        if getattr(spec_config, "cp_pipeline", "skip") == "skip":  # main: "exact" transports the pairs
            warn_cross_stage_pairs(config, moe_layers, hybrid_layer_pattern)
    if config.moe_router_topk == 1 and (spec_config.sp_coeff > 0 or spec_config.ortho_coeff > 0):
        logger.warning("moe_router_topk is 1: R_sp and L_o compare a token's experts pairwise and "
                       "are 0 with a single expert per token")


# ---------------------------------------------------------------------------- the doc
DOC_INTRO = """# Compatibility: exact or refused

The rule: with any specialization loss (R_sp, R_cp, L_o, L_v) or the metrics on, every option of
megatron-core's `TransformerConfig` that touches the MoE layer, the router, the dispatcher,
recomputation, precision, context parallelism or multi-token prediction is one of

- **exact**: tested against a one-process or no-option reference on CPU (the test is named);
- **refused**: `check_compatibility` (run by `get_moe_block_spec` and `specialize_block_spec`) raises
  `ValueError` with the one line below, naming the option and the fix;
- **no interaction**: the option cannot change what the losses see (the reason is given).

GPU-only paths are refused until a GPU test exists. With every coefficient 0 and the metrics off,
nothing is refused and megatron's spec is returned unchanged (off means stock megatron-core).

"Versions" says where the field exists among the tested ends, megatron-core 0.16.1 and 0.19.2
("main": in neither; refused through `getattr` where it exists). `tests/test_compatibility.py`
fails on any field of the installed `TransformerConfig` whose name matches
`megatron_moe_spec.core.compatibility.FIELD_FILTER` and has no row here, and checks that each refusal
raises exactly the message below. The table is generated from `megatron_moe_spec/core/compatibility.py`
(`OPTIONS`), the one source of truth:

    python -m megatron_moe_spec.core.compatibility > docs/compatibility.md

"""


DOC_HYBRID = """## HybridModel (megatron-core >= 0.19)

`core.hybrid.get_hybrid_stack_spec` (or the YAML key `model.hybrid_layer_pattern`) puts the losses into
megatron-core's `HybridModel`; `check_compatibility` above applies to it as to a GPTModel, and
`core.hybrid.check_hybrid_pattern` checks the layer pattern, refusing with one line naming the symbol and
the fix. On megatron-core 0.16 there is no HybridModel: the YAML key is refused.

- **Layer families.** `*` attention, `-` dense MLP and `E` MoE: exact on CPU (tests/test_hybrid.py: a GPT
  MoE model and its `*E*E` equivalent give the same losses and gradients; R_cp pairs each `E` with the
  next `E` across the layers between). `M` (Mamba) and `G` (gated delta net): accepted only where their
  CUDA kernels import (the refusal names the module); their GPU test (tests/test_gpu_hybrid.py) has not
  run yet. `D` (DeepSeek sparse attention), `+` (MLA) and an MTP part (`/`): refused.
- **Pipeline parallelism.** `|` segments work under PP and PP x VPP (one segment per model chunk,
  pp x vpp segments; other layouts are refused): an R_cp pair across a segment boundary is exact through
  the side channel with `cp_pipeline: exact` (left out, with a warning, under `skip`).
  tests/test_hybrid_parity.py: TP2+SP, EP2 (alltoall, allgather), PP2 across a `|`, PP2xVPP2, PP2xEP2
  (4 ranks), PP2 with full uniform and with selective `moe` recomputation equal one process, each loss
  alone too.
- **Recomputation.** Full uniform and selective `moe`: exact with every loss on, under PP too (the
  cross-stage values travel in the first pass only); full block: exact without R_cp, refused with R_cp
  (`recompute_method` above) (tests/test_hybrid.py::test_recompute_matches_no_recompute,
  tests/test_hybrid_parity.py::test_hybrid_losses_match_one_process[pp2_full_recompute, pp2_moe_recompute]).
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """``docs/compatibility.md``: the intro, one row per option, in :data:`OPTIONS` order, then the
    HybridModel section (:data:`DOC_HYBRID`)."""
    lines = [DOC_INTRO.rstrip("\n"), "",
             "| Option | Versions | Status | Test / reason / when refused | Refusal message |",
             "|---|---|---|---|---|"]
    for name, opt in OPTIONS.items():
        message = f"`{_cell(opt.message)}`" if opt.message else ""
        lines.append(f"| `{name}` | {opt.versions} | {opt.status} | {_cell(opt.detail)} | {message} |")
    lines += ["", DOC_HYBRID.rstrip("\n")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
