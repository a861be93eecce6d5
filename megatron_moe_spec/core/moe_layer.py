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
import functools
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_moe_spec import losses
from megatron_moe_spec.core import aux_losses, layer_metrics, profiling, stage_transport
from megatron_moe_spec.core.expert_capture import capture_expert_rows, ungate
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
    remote: bool = False  # received from another pipeline stage (mass_T is a leaf whose gradient goes back)


@dataclass
class _QueuedMass:
    """One R_cp recompute-queue entry: the other layer's first-pass mass, and the tag a pop checks."""

    mass_T: torch.Tensor  # the other layer's top-k mass M (detached)
    valid_T: torch.Tensor
    layer_number: int  # the other layer
    owner_layer: int  # the layer whose queue this is
    owner_mass_T: torch.Tensor  # the owner's first-pass mass of the same micro-batch


class SpecializationMoELayer(MoELayer):
    """``MoELayer`` + the specialization losses and metrics (see the module docstring)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 spec_config: Optional[SpecializationConfig] = None,
                 hybrid_layer_pattern: Optional[str] = None, **kwargs):
        # kwargs: what newer megatron-core passes on (is_mtp_layer, name in 0.19).
        # hybrid_layer_pattern: the HybridModel's pattern when this layer is one of its E layers
        # (its MoE layers and pipeline stages follow the pattern, not moe_layer_freq).
        pg_collection = pg_collection if pg_collection is not None else get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, **kwargs)
        self.spec = spec_config if spec_config is not None else SpecializationConfig()
        self.hybrid_layer_pattern = hybrid_layer_pattern
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
        self._step = 0  # the training iteration (begin_step): rotates the sp_max_tokens subset
        self._tokens_SB = None
        self._cross_stage = None  # see _cross_stage_peers
        # R_cp under activation recomputation (see _coupling_under_recompute): first-pass values
        # queued for the recompute pass, in micro-batch order (megatron recomputes in forward order).
        self._previous_mass_fifo = collections.deque()  # _QueuedMass of layer l, in this layer l'
        self._next_mass_fifo = collections.deque()      # _QueuedMass of layer l', in this layer l

    # ------------------------------------------------------------------ queries
    def _loss_pass(self) -> bool:
        """This forward builds the graph the losses attach to (training with grad enabled: the only
        pass of a plain layer, the recompute pass of a checkpointed one)."""
        return self.training and torch.is_grad_enabled()

    def _metrics_pass(self) -> bool:
        """The metrics of this micro-batch are collected in this forward (see _collect_metrics_now)."""
        return self.spec.metrics and self._metrics_step and self._collect_metrics_now()

    def _wants_z(self) -> bool:
        """z travels only when something consumes it in this pass: R_sp, or the similarity metric
        on a metrics step. (Every EP rank decides alike: the exchange is a collective.)"""
        return self.topk > 1 and ((self.spec.sp_coeff > 0 and self._loss_pass()) or self._metrics_pass())

    def _wants_y(self) -> bool:
        return self.topk > 1 and self.spec.ortho_coeff > 0 and self._loss_pass()

    def begin_step(self, metrics: bool, step: Optional[int] = None) -> None:
        """Call once before each training step (the driver and the Megatron-LM hooks do).

        ``metrics``: collect the routing metrics in this step (the driver's ``metrics_interval``).
        ``step``: the training iteration about to run (the same on every rank); it rotates the
        ``sp_max_tokens`` subset (``losses.global_strided_mask``'s offset). None keeps the last one.
        Also empties R_cp's recompute queues: every micro-batch's recompute pass runs inside the
        step of its first pass, so anything left is from a forward that had no backward (a
        train-mode forward under ``torch.no_grad()``) and must not pair with a later micro-batch.
        """
        self._metrics_step = metrics
        if step is not None:
            self._step = int(step)
        if self._previous_mass_fifo or self._next_mass_fifo:
            logger.debug("layer %d: dropping %d + %d unconsumed R_cp recompute entries",
                         self.layer_number, len(self._previous_mass_fifo), len(self._next_mass_fifo))
        self._previous_mass_fifo.clear()
        self._next_mass_fifo.clear()
        stage_transport.finish_sends()

    # ------------------------------------------------------------------ megatron's steps
    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        self._record = self.router.pop_record()
        self._tokens_SB = tuple(hidden_states.shape[:2])  # [S_local, B]: this rank's sequence shard
        return probs, routing_map

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        want_z, want_y = self._wants_z(), self._wants_y()
        if self._record is None or not (want_z or want_y):
            return super().routed_experts_compute(hidden_states, probs)
        dispatcher = self.token_dispatcher
        # The allgather dispatcher forgets its gathered routing map in dispatch_postprocess.
        gathered_map = getattr(dispatcher, "routing_map", None)
        with capture_expert_rows(self.experts, fc2_inputs=want_z) as captured:
            output, mlp_bias = super().routed_experts_compute(hidden_states, probs)

        # The rows travel in the experts' own dtype (bf16 in bf16 training): ungate divides in fp32
        # and returns that dtype; the losses upcast inside their Gram kernels.
        with profiling.span(profiling.UNGATE_EXCHANGE):
            pieces = []
            if want_z:
                z_rows = ungate(captured.gated_z(), captured.permuted_probs)  # [R, F / etp]
                etp_rank = self.expert_tp_group.rank() if self.expert_tp_group is not None else 0
                pieces.append(place_shard(z_rows, etp_rank * z_rows.shape[-1], self.ffn_size))
            if want_y:
                y_rows = ungate(captured.expert_output, captured.permuted_probs)  # [R, H], partial over ETP
                pieces.append(y_rows.to(pieces[0].dtype) if pieces else y_rows)
            rows = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
            tokens_TKW = rows_to_tokens(dispatcher, rows, self._record, gathered_map, self._exchange_selection())
            width_z = self.ffn_size if want_z else 0
            self._z_TKF = tokens_TKW[..., :width_z] if want_z else None
            self._y_TKH = tokens_TKW[..., width_z:] if want_y else None
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
        with profiling.span(profiling.LOSSES):
            return self._apply_specialization(output, record, z_TKF, y_TKH, incoming)

    # ------------------------------------------------------------------ the losses
    def _apply_specialization(self, output, record: RoutingRecord, z_TKF, y_TKH,
                              incoming: Optional[RoutingCarry]):
        spec = self.spec
        mass_T = losses.topk_mass(record.probs_TE, record.topk_idx_TK)
        self.outgoing = RoutingCarry(self.layer_number, mass_T, record.valid_T, record.top1_T,
                                     record.num_experts, producer=self)
        previous_stage, next_stage = self._cross_stage_peers()
        transport = self.training and spec.cp_coeff > 0 and self._first_pass()
        if previous_stage is not None and transport:
            incoming = self._receive_previous(previous_stage, record)
        if next_stage is not None and transport:
            packed = torch.stack([mass_T.detach().float(), record.valid_T.float(), record.top1_T.float()])
            stage_transport.send(packed, next_stage[1], stage_transport.tag(next_stage[0], backward=False))
        if self._metrics_pass():
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
        # Per-token loss: finalize_model_grads divides every gradient by the LM token count summed
        # over DPxCP, each rank counting its CP shard of the sequence. Multiplying by the micro-batch's
        # token count (every non-padding token of the whole sequence: over TPxCP, capacity-dropped
        # tokens included, as the LM counts them) keeps the effective coefficient of the run without
        # per-token loss (megatron-core 0.16.1 multiplies its own aux losses by the sequence-parallel
        # shard's count instead, which divides their gradient by TP; see docs/parallelism.md).
        lm_tokens = aux_losses.global_valid_tokens(record.not_padding_T, self.tp_cp_group) if per_token else None

        def attach(name, coeff, partial, layer_number=self.layer_number, log=True):
            nonlocal output
            output = aux_losses.attach_loss(output, coeff, partial, per_token, lm_tokens)
            if log:
                aux_losses.log_loss(name, partial, layer_number, num_layers, self.tp_cp_group)

        if self.topk > 1 and (spec.sp_coeff > 0 or spec.ortho_coeff > 0):
            # sp_max_tokens: the same tokens in every layout (chosen by global position).
            pair_valid_T, pair_share = valid_T, share
            if spec.sp_max_tokens is not None:
                pair_valid_T = valid_T & self._budget_mask_T(valid_T.device)
                pair_share = pair_valid_T.sum().float() / aux_losses.global_valid_tokens(
                    pair_valid_T, self.tp_cp_group).clamp(min=1.0)
                # The kernels save their input for backward: give them the chosen tokens' rows only
                # ([m, k, F], m = this rank's share of the budget), not the full [T, k, F] tensor, so the
                # budget cuts R_sp's / L_o's activation memory as it cuts their traffic. The gather
                # saves only its indices.
                rows_m = pair_valid_T.nonzero().squeeze(1)
                z_TKF = z_TKF.index_select(0, rows_m) if z_TKF is not None else None
                y_TKH = y_TKH.index_select(0, rows_m) if y_TKH is not None else None
                pair_valid_T = None  # every chosen row is valid
            if spec.sp_coeff > 0:
                value = losses.specialization_loss(z_TKF, pair_valid_T, spec.sp_similarity, spec.eps)
                attach(aux_losses.SPECIALIZATION_LOSS, spec.sp_coeff, value * pair_share)
            if spec.ortho_coeff > 0:
                value = losses.orthogonality_loss(y_TKH, pair_valid_T, spec.eps)
                attach(aux_losses.ORTHOGONALITY_LOSS, spec.ortho_coeff, value * pair_share)
        if spec.var_coeff > 0:
            attach(aux_losses.VARIANCE_LOSS, spec.var_coeff, self._variance_partial(record, total_n))
        if spec.cp_coeff > 0 and next_stage is not None:
            # The stage of the next MoE layer sends back dR/dM^l in backward.
            output = stage_transport.InjectGradient.apply(
                output, mass_T, next_stage[1], stage_transport.tag(next_stage[0], backward=True))
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

    # ------------------------------------------------------------------ R_cp across pipeline stages
    def _first_pass(self) -> bool:
        """The forward that runs once per micro-batch: the only pass of a plain layer, the first
        (no-grad) pass of a recomputed one. Cross-stage values are sent and received here."""
        return not (self._recomputed and torch.is_grad_enabled())

    def _cross_stage_peers(self):
        """((next MoE layer, its pipeline rank) or None for the pair this layer starts, and the same for
        the pair it ends) when that pair crosses a pipeline stage or model chunk and
        ``cp_pipeline: exact``. Returned as (previous, next)."""
        if self._cross_stage is None:
            previous = following = None
            pp = self.config.pipeline_model_parallel_size or 1
            if self.spec.cp_coeff > 0 and self.spec.cp_pipeline == "exact" and pp > 1:
                from megatron_moe_spec.core.layer_specs import moe_layer_numbers

                pattern = self.hybrid_layer_pattern
                numbers = moe_layer_numbers(self.config, pattern)
                i = numbers.index(self.layer_number)
                owner = functools.partial(stage_transport.pipeline_owner, self.config,
                                          hybrid_layer_pattern=pattern)
                mine = owner(self.layer_number)
                if i > 0 and owner(numbers[i - 1]) != mine:
                    previous = (numbers[i - 1], owner(numbers[i - 1])[0])
                if i + 1 < len(numbers) and owner(numbers[i + 1]) != mine:
                    following = (numbers[i + 1], owner(numbers[i + 1])[0])
            self._cross_stage = (previous, following)
        return self._cross_stage

    def _receive_previous(self, previous_stage, record: RoutingRecord) -> RoutingCarry:
        """The carry of the previous MoE layer, from its stage: M^l arrives as a leaf whose gradient
        (this stage's dR/dM^l) is sent back when backward computes it."""
        layer_number, rank = previous_stage
        packed = stage_transport.recv((3, record.num_tokens), rank,
                                      stage_transport.tag(self.layer_number, backward=False),
                                      record.probs_TE.device)
        mass_T = packed[0].requires_grad_()
        mass_T.register_hook(stage_transport.send_gradient_hook(
            rank, stage_transport.tag(self.layer_number, backward=True)))
        return RoutingCarry(layer_number, mass_T, packed[1].bool(), packed[2].long(), record.num_experts,
                            remote=True)

    def _queue_for_recompute(self, mass_T, valid_T, incoming: Optional[RoutingCarry]) -> None:
        """First (no-grad) pass of a recomputed layer: keep the values R_cp's recompute pass needs.

        Each entry is tagged with the layer pair and with the first-pass top-k mass of the layer
        that will pop it, which its recompute pass reproduces exactly: a pop checks both, so an
        entry of another micro-batch can never be paired silently (see _pop_checked)."""
        if incoming is None or (incoming.producer is None and not incoming.remote):
            return
        own_mass = mass_T.detach()
        if incoming.remote:  # from another stage: the leaf itself, whose gradient travels back
            self._previous_mass_fifo.append(_QueuedMass(incoming.mass_T, incoming.valid_T, incoming.layer_number,
                                                        self.layer_number, own_mass))
            return
        previous_mass = incoming.mass_T.detach()
        self._previous_mass_fifo.append(_QueuedMass(previous_mass, incoming.valid_T, incoming.layer_number,
                                                    self.layer_number, own_mass))
        incoming.producer._next_mass_fifo.append(_QueuedMass(own_mass, valid_T, self.layer_number,
                                                             incoming.layer_number, previous_mass))

    def _coupling_under_recompute(self, mass_T, valid_T):
        """R_cp when the router graph of the other layer of a pair does not exist in this pass.

        R = f(M^l, M^l') is split into two terms whose gradients are exactly R's partial gradients:
        layer l' attaches f(sg(M^l), M^l') and layer l attaches f(M^l, sg(M^l')), each with the other
        side's value from the first (no-grad) forward pass of the same micro-batch. The recomputed
        pass reproduces those values exactly, and megatron recomputes micro-batches in forward order,
        so a FIFO per layer pairs them (each pop checked, see _pop_checked). The value is logged
        once, by l' (under l's index).
        Returns ``[(partial, layer_number_to_log_under, log?)]``.
        """
        terms = []
        if self._previous_mass_fifo:
            entry = self._pop_checked(self._previous_mass_fifo, mass_T, "previous")
            terms.append((self._coupling_partial(entry.mass_T, mass_T, entry.valid_T & valid_T),
                          entry.layer_number, True))
        if self._next_mass_fifo:
            entry = self._pop_checked(self._next_mass_fifo, mass_T, "next")
            terms.append((self._coupling_partial(mass_T, entry.mass_T, valid_T & entry.valid_T),
                          self.layer_number, False))
        return terms

    def _pop_checked(self, fifo, mass_T, side: str) -> "_QueuedMass":
        entry = fifo.popleft()
        own = mass_T.detach()
        same = (entry.owner_layer == self.layer_number and entry.owner_mass_T.shape == own.shape
                and torch.allclose(entry.owner_mass_T, own, rtol=1e-5, atol=1e-6))
        if not same:
            fifo.clear()
            raise RuntimeError(
                f"R_cp under recomputation: layer {self.layer_number - 1} (0-based) popped a queued "
                f"'{side}' entry of layer {entry.layer_number - 1} that belongs to another micro-batch "
                "(its recorded top-k mass differs from this recompute pass). A training-mode forward "
                "without its backward ran inside this step; call begin_step() on the MoE layers before "
                "every training step (the driver and the Megatron-LM hooks do), or run such forwards "
                "in eval mode"
            )
        return entry

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

    def _exchange_selection(self) -> Optional[torch.Tensor]:
        """bool [T_local]: the tokens whose rows must travel, or None for all of them.

        With ``sp_max_tokens`` the losses read only the valid tokens of the budget subset, so only
        theirs travel (alltoall under EP; see token_exchange). A metrics pass reads every token's z
        (the similarity metric is not sub-sampled): it exchanges all rows, on metrics steps only.
        """
        if self.spec.sp_max_tokens is None or self._metrics_pass():
            return None
        return self._record.valid_T & self._budget_mask_T(self._record.valid_T.device)

    def _budget_mask_T(self, device) -> torch.Tensor:
        """bool [T_local]: the tokens of ``sp_max_tokens``' global strided subset on this rank.

        The MoE layer sees this rank's [S_local, B] tokens flattened sequence-major; under sequence
        parallelism rank r of the TP group holds positions [r S_local, (r + 1) S_local) of each
        sequence. The subset depends only on the tokens' global (batch, position) indices, so every
        layout picks the same tokens as one process. The subset rotates with the training step
        (``begin_step``), which every rank knows alike.
        """
        s_local, batch = self._tokens_SB
        tp = self.tp_group.size() if self.tp_group is not None else 1
        sharded = self.config.sequence_parallel and tp > 1
        rank = self.tp_group.rank() if sharded else 0
        return losses.global_strided_mask(seq_len=s_local * (tp if sharded else 1), batch_size=batch,
                                          seq_start=rank * s_local, seq_count=s_local,
                                          max_tokens=self.spec.sp_max_tokens, device=device,
                                          offset=self._step)

    def _collect_metrics_now(self) -> bool:
        """Metrics once per micro-batch: in the grad-enabled forward, or, when this layer is
        recomputed, in the first (no-grad) forward."""
        if not self.training:
            return False
        return torch.is_grad_enabled() != self._recomputed
