"""``SpecializationConfig``: the coefficients and options of the specialization losses.

This is the ``specialization:`` block of a run's YAML file, and the second argument (beside
megatron-core's own ``TransformerConfig``) of the layer-spec functions. Pure Python: no torch,
no Megatron. Field meanings follow ../shared/spec/losses.md (docs/spec.md in this repository).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

SP_SIMILARITIES = ("squared_cosine", "abs_cosine")
CP_FORMS = ("product", "log")
V_FORMS = ("paper", "per_token")
CP_PIPELINE_POLICIES = ("exact", "skip")
"""R_cp pairs across pipeline stages: ``exact`` (M^l travels forward, dR/dM^l back; the default) or
``skip`` (left out, with a start-up warning naming them; saves the transfers). docs/parallelism.md."""


@dataclass
class SpecializationConfig:
    """Coefficients and options of R_sp, R_cp, L_o, L_v and the routing metrics.

    All coefficients default to 0 and ``metrics`` to False: the default config is "off", and
    off means stock megatron-core behaviour, bit for bit.
    """

    sp_coeff: float = 0.0
    """lambda_sp, intra-layer specialization loss R_sp (paper default 2e-3)."""
    cp_coeff: float = 0.0
    """lambda_cp, cross-layer coupling loss R_cp (paper default 1e-3)."""
    ortho_coeff: float = 0.0
    """lambda_o, orthogonality loss L_o of arXiv 2505.22323 (baseline)."""
    var_coeff: float = 0.0
    """lambda_v, router variance loss L_v of arXiv 2505.22323 (baseline)."""

    sp_similarity: str = "squared_cosine"
    """R_sp pair similarity: ``squared_cosine`` (default) or ``abs_cosine``."""
    sp_max_tokens: Optional[int] = None
    """Evaluate R_sp (and L_o) on an evenly strided subset of at most this many valid tokens per
    micro-batch, chosen by global position (``losses.global_strided_mask``), so every parallel
    layout picks the same tokens; None = all tokens. Under EP with the alltoall dispatcher only these
    tokens' z / y rows travel (except on metrics steps, whose similarity metric reads every token)."""
    cp_form: str = "product"
    """R_cp form: ``product`` = -mean M^l M^l', ``log`` = -mean log(M^l M^l' + 1e-9)."""
    cp_pipeline: str = "exact"
    """Adjacent MoE layers on different pipeline stages / model chunks: ``exact`` (default: the earlier
    layer's top-k mass travels forward over a side channel and dR/dM back, T values each way per pair
    and micro-batch; R_cp equals one process) or ``skip`` (the pair is left out of R_cp, with a
    start-up warning naming it, 0-based as in the logs; saves the transfers)."""
    v_form: str = "paper"
    """L_v form: ``paper`` (variance over tokens of each expert's gate) or ``per_token``."""
    eps: float = 1e-6
    """The eps of the cosine / projection denominators (computed in fp32)."""

    metrics: bool = False
    """Compute and log the routing metrics (no gradient; never changes the gradients)."""
    metrics_interval: int = 1
    """Compute the metrics every this many training iterations (they cost a little time)."""

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ queries
    @property
    def any_loss(self) -> bool:
        return any(c != 0.0 for c in (self.sp_coeff, self.cp_coeff, self.ortho_coeff, self.var_coeff))

    @property
    def enabled(self) -> bool:
        """True when anything at all is computed (a loss or the metrics)."""
        return self.any_loss or self.metrics

    @property
    def needs_expert_activations(self) -> bool:
        """R_sp, L_o and the activation-similarity metric need each token's k expert tensors."""
        return self.sp_coeff != 0.0 or self.ortho_coeff != 0.0 or self.metrics

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix for any invalid value."""
        for name in ("sp_coeff", "cp_coeff", "ortho_coeff", "var_coeff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"specialization.{name} must be a number, got {value!r}")
            if value < 0:
                raise ValueError(
                    f"specialization.{name} must be >= 0 (the losses are minimized; a negative "
                    f"coefficient would maximize them), got {value!r}"
                )
            setattr(self, name, float(value))
        _check_choice("sp_similarity", self.sp_similarity, SP_SIMILARITIES)
        _check_choice("cp_form", self.cp_form, CP_FORMS)
        _check_choice("cp_pipeline", self.cp_pipeline, CP_PIPELINE_POLICIES)
        _check_choice("v_form", self.v_form, V_FORMS)
        if self.sp_max_tokens is not None and (
            isinstance(self.sp_max_tokens, bool)
            or not isinstance(self.sp_max_tokens, int)
            or self.sp_max_tokens < 1
        ):
            raise ValueError(
                f"specialization.sp_max_tokens must be a positive integer or null (all tokens), "
                f"got {self.sp_max_tokens!r}"
            )
        if not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"specialization.eps must be > 0, got {self.eps!r}")
        if not isinstance(self.metrics, bool):
            raise ValueError(f"specialization.metrics must be true or false, got {self.metrics!r}")
        if not isinstance(self.metrics_interval, int) or self.metrics_interval < 1:
            raise ValueError(
                f"specialization.metrics_interval must be an integer >= 1, got {self.metrics_interval!r}"
            )

    @classmethod
    def from_dict(cls, values: dict) -> "SpecializationConfig":
        """Build from a plain dict (the YAML block); unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown key(s) in specialization: {', '.join(unknown)}; "
                f"known keys are: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(
            f"specialization.{name} must be one of {', '.join(choices)}; got {value!r}"
        )
