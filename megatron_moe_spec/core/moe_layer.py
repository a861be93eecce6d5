"""``SpecializationMoELayer``: megatron's ``MoELayer`` with R_sp, R_cp, L_o, L_v and the metrics.

The layer computes exactly what ``MoELayer`` computes (same routing, same dispatch, same experts,
same output) and, per micro-batch, when the ``SpecializationConfig`` asks for it:

1. ``route``: takes the router's :class:`RoutingRecord` (pre-top-k p, gates, routing map, valid tokens).
2. ``routed_experts_compute``: captures each expert's SwiGLU intermediate z (and unweighted output y
   for L_o) and brings each token's k rows back to the token's rank, side by side (token_exchange).
3. ``postprocess`` (the last step of megatron's ``custom_forward``, so inside the MoE recompute
   region when MoE recompute is on): computes the losses from the pure functions in
   ``megatron_moe_spec.losses`` and attaches them to the layer output with megatron's aux-loss
   autoscaler; R_cp pairs this layer with the previous MoE layer whose top-k mass arrived with the
   hidden states (``incoming``, set by ``SpecializationTransformerLayer``).

Reduction: every loss is a per-rank partial over the local tokens divided by the valid tokens of the
micro-batch across TPxCP (see ``aux_losses``).
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_moe_spec import losses
from megatron_moe_spec.core import aux_losses, layer_metrics
from megatron_moe_spec.core.expert_capture import capture_fc2_inputs, ungate
from megatron_moe_spec.core.router import SpecializationRouter
from megatron_moe_spec.core.routing_record import RoutingRecord
from megatron_moe_spec.core.token_exchange import place_shard, rows_to_tokens
from megatron_moe_spec.specialization_config import SpecializationConfig

logger = logging.getLogger(__name__)


@dataclass
class RoutingCarry:
    """What an MoE layer hands to the next MoE layer along with the hidden states."""

    layer_number: int
    mass_T: torch.Tensor  # top-k mass M_t with autograd history to this layer's router
    valid_T: torch.Tensor
    top1_T: torch.Tensor
    num_experts: int
    producer: Any = None  # the SpecializationMoELayer that made it (same rank, same stage)


class SpecializationMoELayer(MoELayer):
    """``MoELayer`` + the specialization losses and metrics (see the module docstring)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 spec_config: Optional[SpecializationConfig] = None, **kwargs):
        # kwargs: what newer megatron-core passes on (is_mtp_layer, name in 0.19).
        pg_collection = pg_collection if pg_collection is not None else get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, **kwargs)
        self.spec = spec_config if spec_config is not None else SpecializationConfig()
        if not isinstance(self.router, SpecializationRouter):
            raise TypeError(
                "SpecializationMoELayer needs MoESubmodules(router=SpecializationRouter); build the "
                "layer spec with megatron_moe_spec.core.layer_specs"
            )
        self.router.record_routing = self.spec.enabled
        self.tp_cp_group = pg_collection.tp_cp
        self.expert_tp_group = pg_collection.expt_tp
        self.topk = config.moe_router_topk
        self.ffn_size = config.moe_ffn_hidden_size
        self.incoming: Optional[RoutingCarry] = None
        self.outgoing: Optional[RoutingCarry] = None
        self._record: Optional[RoutingRecord] = None
        self._z_TKF: Optional[torch.Tensor] = None
        self._y_TKH: Optional[torch.Tensor] = None
        self._metrics_step = True
        # R_cp under activation recomputation (see _coupling_under_recompute): first-pass values
        # queued for the recompute pass, in micro-batch order (megatron recomputes in forward order).
        self._previous_mass_fifo = collections.deque()  # (M^l, valid^l, l) for this layer l'
        self._next_mass_fifo = collections.deque()      # (M^l', valid^l') for this layer l

    # ------------------------------------------------------------------ queries
    @property
    def _needs_z(self) -> bool:
        return self.topk > 1 and (self.spec.sp_coeff > 0 or (self.spec.metrics and self._metrics_step))

    @property
    def _needs_y(self) -> bool:
        return self.topk > 1 and self.spec.ortho_coeff > 0

    def set_metrics_step(self, active: bool) -> None:
        """The driver turns metric collection on for the iterations it logs (``metrics_interval``)."""
        self._metrics_step = active

    # ------------------------------------------------------------------ megatron's steps
    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        self._record = self.router.pop_record()
        return probs, routing_map

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        if self._record is None or not (self._needs_z or self._needs_y):
            return super().routed_experts_compute(hidden_states, probs)
        dispatcher = self.token_dispatcher
        # The allgather dispatcher forgets its gathered routing map in dispatch_postprocess.
        gathered_map = getattr(dispatcher, "routing_map", None)
        dispatched, tokens_per_expert, permuted_probs = dispatcher.dispatch_postprocess(hidden_states, probs)
        with capture_fc2_inputs(self.experts) as fc2_inputs:
            expert_output, mlp_bias = self.experts(dispatched, tokens_per_expert, permuted_probs)
        assert mlp_bias is None, f"mlp_bias is not supported for {type(dispatcher)}"

        pieces = []
        if self._needs_z:
            z_rows = ungate(torch.cat(fc2_inputs, dim=0), permuted_probs)  # [R, F / etp]
            etp_rank = self.expert_tp_group.rank() if self.expert_tp_group is not None else 0
            pieces.append(place_shard(z_rows, etp_rank * z_rows.shape[-1], self.ffn_size))
        if self._needs_y:
            pieces.append(ungate(expert_output, permuted_probs))  # [R, H], partial over ETP
        tokens_TKW = rows_to_tokens(dispatcher, torch.cat(pieces, dim=1), self._record, gathered_map)
        width_z = self.ffn_size if self._needs_z else 0
        self._z_TKF = tokens_TKW[..., :width_z] if self._needs_z else None
        self._y_TKH = tokens_TKW[..., width_z:] if self._needs_y else None

        output = dispatcher.combine_preprocess(expert_output)
        return output, mlp_bias

    def postprocess(self, output: torch.Tensor, shared_expert_output: Optional[torch.Tensor]):
        output = super().postprocess(output, shared_expert_output)
        record, self._record = self._record, None
        z_TKF, self._z_TKF = self._z_TKF, None
        y_TKH, self._y_TKH = self._y_TKH, None
        incoming, self.incoming = self.incoming, None
        if record is None:
            self.outgoing = None
            return output
        return self._apply_specialization(output, record, z_TKF, y_TKH, incoming)

    # ------------------------------------------------------------------ the losses
    def _apply_specialization(self, output, record: RoutingRecord, z_TKF, y_TKH,
                              incoming: Optional[RoutingCarry]):
        spec = self.spec
        mass_T = losses.topk_mass(record.probs_TE, record.topk_idx_TK)
        self.outgoing = RoutingCarry(self.layer_number, mass_T, record.valid_T, record.top1_T,
                                     record.num_experts, producer=self)
        if spec.metrics and self._metrics_step and self._collect_metrics_now():
            layer_metrics.update(self.layer_number, record, z_TKF, incoming)
        if self.training and not torch.is_grad_enabled() and spec.cp_coeff > 0 and self._recomputed:
            self._queue_for_recompute(mass_T, record.valid_T, incoming)
        if not (self.training and torch.is_grad_enabled() and spec.any_loss):
            return output

        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        per_token = self.config.calculate_per_token_loss
        valid_T = record.valid_T
        local_n = valid_T.sum().float()
        total_n = aux_losses.global_valid_tokens(valid_T, self.tp_cp_group)
        share = local_n / total_n.clamp(min=1.0)  # this rank's part of the micro-batch mean
        # Per-token loss: finalize_model_grads divides every gradient by the LM token count, which
        # each rank counts over the full sequence of its CP shard (TP ranks see the whole sequence).
        # Multiplying by that count keeps the effective coefficient of the run without per-token
        # loss (megatron-core 0.16.1 multiplies its own aux losses by the sequence-parallel shard's
        # count instead, which divides their gradient by TP; see docs/parallelism.md).
        lm_tokens = aux_losses.global_valid_tokens(valid_T, self.tp_group) if per_token else None

        def attach(name, coeff, partial, layer_number=self.layer_number, log=True):
            nonlocal output
            output = aux_losses.attach_loss(output, coeff, partial, per_token, lm_tokens)
            if log:
                aux_losses.log_loss(name, partial, layer_number, num_layers, self.tp_cp_group)

        if spec.sp_coeff > 0 and self.topk > 1:
            value = losses.specialization_loss(z_TKF, valid_T, spec.sp_similarity, spec.eps,
                                               max_tokens=self._per_rank_max_tokens())
            attach(aux_losses.SPECIALIZATION_LOSS, spec.sp_coeff, value * share)
        if spec.ortho_coeff > 0 and self.topk > 1:
            value = losses.orthogonality_loss(y_TKH, valid_T, spec.eps,
                                              max_tokens=self._per_rank_max_tokens())
            attach(aux_losses.ORTHOGONALITY_LOSS, spec.ortho_coeff, value * share)
        if spec.var_coeff > 0:
            attach(aux_losses.VARIANCE_LOSS, spec.var_coeff, self._variance_partial(record, total_n))
        if spec.cp_coeff > 0 and self._recomputed:
            for partial, layer_number, log in self._coupling_under_recompute(mass_T, valid_T):
                attach(aux_losses.COUPLING_LOSS, spec.cp_coeff, partial, layer_number, log)
        elif spec.cp_coeff > 0 and incoming is not None:
            # Both routers' graphs exist: one term. R_cp^l is indexed by the earlier layer l.
            partial = self._coupling_partial(incoming.mass_T, mass_T, valid_T & incoming.valid_T)
            attach(aux_losses.COUPLING_LOSS, spec.cp_coeff, partial, incoming.layer_number)
        return output

    # ------------------------------------------------------------------ R_cp and recomputation
    @property
    def _recomputed(self) -> bool:
        """This MoE layer's forward is checkpointed (MoE-level or full-layer recompute)."""
        return self.moe_layer_recompute or self.config.recompute_granularity == "full"

    def _queue_for_recompute(self, mass_T, valid_T, incoming: Optional[RoutingCarry]) -> None:
        """First (no-grad) pass of a recomputed layer: keep the values R_cp's recompute pass needs."""
        if incoming is None or incoming.producer is None:
            return
        self._previous_mass_fifo.append((incoming.mass_T.detach(), incoming.valid_T, incoming.layer_number))
        incoming.producer._next_mass_fifo.append((mass_T.detach(), valid_T))

    def _coupling_under_recompute(self, mass_T, valid_T):
        """R_cp when the router graph of the other layer of a pair does not exist in this pass.

        R = f(M^l, M^l') is split into two terms whose gradients are exactly R's partial gradients:
        layer l' attaches f(sg(M^l), M^l') and layer l attaches f(M^l, sg(M^l')), each with the other
        side's value from the first (no-grad) forward pass of the same micro-batch. The recomputed
        pass reproduces those values exactly, and megatron recomputes micro-batches in forward order,
        so a FIFO per layer pairs them. The value is logged once, by l' (under l's index).
        Returns ``[(partial, layer_number_to_log_under, log?)]``.
        """
        terms = []
        if self._previous_mass_fifo:
            previous_mass, previous_valid, previous_layer = self._previous_mass_fifo.popleft()
            terms.append((self._coupling_partial(previous_mass, mass_T, previous_valid & valid_T),
                          previous_layer, True))
        if self._next_mass_fifo:
            next_mass, next_valid = self._next_mass_fifo.popleft()
            terms.append((self._coupling_partial(mass_T, next_mass, valid_T & next_valid),
                          self.layer_number, False))
        return terms

    def _coupling_partial(self, mass_T, next_mass_T, joint_valid):
        """This rank's partial of R_cp for one pair (see aux_losses for the reduction contract)."""
        joint_local = joint_valid.sum().float()
        joint_total = aux_losses.global_valid_tokens(joint_valid, self.tp_cp_group)
        value = losses.coupling_loss_from_mass(mass_T, next_mass_T, joint_valid, self.spec.cp_form)
        return value * joint_local / joint_total.clamp(min=1.0)

    def _variance_partial(self, record: RoutingRecord, total_n: torch.Tensor) -> torch.Tensor:
        """This rank's partial of L_v; the partials sum over TPxCP to the micro-batch's L_v.

        ``per_token``: a per-token mean, split like the other losses. ``paper``: the variance over
        all tokens of the micro-batch, -(1/E) sum_e (S2_e/N - S1_e^2/N^2) with S1, S2 the sums of
        g and g^2 over the valid tokens of all TPxCP ranks. Rank r contributes
        -(1/E) sum_e [S2_r/N - (2 S1_r S1' - S1'^2 / R) / N^2] with S1' the (detached) global sum,
        which sums to the right value and has exactly the right gradient on every rank.
        """
        spec, valid_T = self.spec, record.valid_T
        if spec.v_form == "per_token":
            local_n = valid_T.sum().float()
            value = losses.variance_loss(record.gates_TE, valid_T, form="per_token", probs=record.probs_TE)
            return value * local_n / total_n.clamp(min=1.0)
        g_TE = torch.where(valid_T[:, None], record.gates_TE.float(), torch.zeros_like(record.gates_TE.float()))
        s1_E, s2_E = g_TE.sum(0), g_TE.square().sum(0)
        s1_global = s1_E.detach().clone()
        group = self.tp_cp_group
        size = group.size() if group is not None else 1
        if size > 1:
            torch.distributed.all_reduce(s1_global, group=group)
        n = total_n.clamp(min=1.0)
        per_expert = s2_E / n - (2 * s1_E * s1_global - s1_global.square() / size) / n.square()
        return -per_expert.mean()

    def _per_rank_max_tokens(self) -> Optional[int]:
        if self.spec.sp_max_tokens is None:
            return None
        size = self.tp_cp_group.size() if self.tp_cp_group is not None else 1
        return max(1, self.spec.sp_max_tokens // size)

    def _collect_metrics_now(self) -> bool:
        """Metrics once per micro-batch: in the grad-enabled forward, or, when this layer is
        recomputed, in the first (no-grad) forward."""
        if not self.training:
            return False
        recomputed = self.moe_layer_recompute or self.config.recompute_granularity == "full"
        return torch.is_grad_enabled() != recomputed
