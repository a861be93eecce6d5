"""``SpecializationTransformerLayer``: megatron's ``TransformerLayer`` that carries routing forward.

R_cp pairs adjacent MoE layers of the same forward pass. The earlier layer's top-k mass (with its
autograd history) rides on the hidden-state tensor that flows to the next layer, as a Python
attribute: it is tied to one micro-batch and one pass by construction (no global stash, so 1F1B's
interleaving of micro-batches and train/eval switches cannot mix them up). Dense layers pass it on.

Tensors that cross a pipeline stage boundary (p2p send/recv) carry no attributes: those pairs are
left out, and ``layer_specs`` warns at start-up naming them (spec, section 2).

It also hands megatron's ``pg_collection`` to a ``MoELayer`` *subclass* (megatron's
``TransformerLayer`` does that only for ``MoELayer`` itself, by an identity check, and otherwise
falls back to the default process groups with an "Unknown MLP type" warning).
"""
from __future__ import annotations

import dataclasses
import logging

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_moe_spec.core.moe_layer import SpecializationMoELayer

CARRY_ATTRIBUTE = "_megatron_moe_spec_routing"


class _DropUnknownMlpWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


class RoutingCarryMixin:
    """The routing carry of R_cp and the ``pg_collection`` hand-over, for any ``TransformerLayer``
    subclass (see the module docstring): ``SpecializationTransformerLayer`` (GPT blocks) and
    ``core.hybrid.SpecializationMoETransformerLayer`` (HybridModel's ``E`` layers). Layers of other
    classes pass the carry on only when their container does it for them (``core.hybrid``'s stack)."""

    def __init__(self, config, submodules, layer_number=1, hidden_dropout=None, pg_collection=None,
                 vp_stage=None, **kwargs):
        mlp = submodules.mlp
        if (pg_collection is not None and isinstance(mlp, ModuleSpec) and isinstance(mlp.module, type)
                and issubclass(mlp.module, MoELayer) and mlp.module is not MoELayer):
            mlp = dataclasses.replace(mlp, params={**(mlp.params or {}), "pg_collection": pg_collection})
            submodules = dataclasses.replace(submodules, mlp=mlp)
        megatron_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
        quiet = _DropUnknownMlpWarning()
        megatron_logger.addFilter(quiet)
        try:
            super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                             hidden_dropout=hidden_dropout, pg_collection=pg_collection,
                             vp_stage=vp_stage, **kwargs)
        finally:
            megatron_logger.removeFilter(quiet)

    def forward(self, *args, **kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        carry = getattr(hidden_states, CARRY_ATTRIBUTE, None)
        is_moe = isinstance(self.mlp, SpecializationMoELayer)
        if is_moe:
            self.mlp.incoming = carry
        result = super().forward(*args, **kwargs)
        if is_moe:
            carry, self.mlp.outgoing = self.mlp.outgoing, None
        output = result[0] if isinstance(result, tuple) else result
        if carry is not None:
            setattr(output, CARRY_ATTRIBUTE, carry)
        return result


class SpecializationTransformerLayer(RoutingCarryMixin, TransformerLayer):
    """``TransformerLayer`` + the routing carry of R_cp (see the module docstring)."""
