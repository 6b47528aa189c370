"""Small strategy classes over the pure functions in ``fedmoe.aggregate``.

``StalenessDecay`` turns a staleness τ into the weight s(τ) of an update;
``GatewayMerge`` turns the experts into the gateway adapter. Constructors take
keyword-only arguments and validate them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedmoe import aggregate
from fedmoe.config import LoraSettings
from fedmoe.fields import (
    MERGE_METHODS,
    STALENESS_KINDS,
    MergeMethod,
    StalenessKind,
    check_staleness_parameters,
)

__all__ = ["MERGE_METHODS", "STALENESS_KINDS", "GatewayMerge", "StalenessDecay"]


@dataclass(frozen=True)
class StalenessDecay:
    """s(τ) for one of the named decay functions; ``a`` and ``b`` are its parameters."""

    kind: StalenessKind = "inverse"
    a: float | None = None
    b: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_KINDS:
            raise ValueError(f"staleness kind must be one of {STALENESS_KINDS}, got {self.kind!r}")
        if self.a is not None and (self.a < 0 or not math.isfinite(self.a)):
            raise ValueError(f"staleness parameter a must be finite and >= 0, got {self.a!r}")
        if self.b is not None and self.b < 0:
            raise ValueError(f"staleness parameter b must be >= 0, got {self.b!r}")
        check_staleness_parameters(self.kind, self.a, self.b)

    def _function(self) -> Callable[[int], float]:
        table: dict[str, Callable[..., float]] = {
            "inverse": aggregate.inverse_linear_decay,
            "constant": aggregate.constant_decay,
            "polynomial": aggregate.polynomial_decay,
            "hinge": aggregate.hinge_decay,
            "exponential": aggregate.exponential_decay,
        }
        kwargs: dict[str, Any] = {}
        if self.a is not None:
            kwargs["a"] = self.a
        if self.b is not None:
            kwargs["b"] = self.b
        function = table[self.kind]
        return lambda tau: function(tau, **kwargs)

    def __call__(self, staleness: int) -> float:
        """The weight of an update that is ``staleness`` versions old."""
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        return self._function()(staleness)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description for status pages."""
        return {"kind": self.kind, "a": self.a, "b": self.b}


class GatewayMerge:
    """Combine experts into the gateway adapter with one of ``MERGE_METHODS``."""

    def __init__(self, *, method: MergeMethod = "cat", lora: LoraSettings) -> None:
        if method not in MERGE_METHODS:
            raise ValueError(f"merge method must be one of {MERGE_METHODS}, got {method!r}")
        self.method = method
        self.lora = lora

    def merge(
        self, experts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
    ) -> aggregate.AdapterState:
        """The gateway adapter for these experts and (normalised) weights."""
        weights = aggregate.normalize_weights(weights)
        if self.method == "linear":
            return aggregate.merge_linear(experts, weights)
        if self.method == "svd":
            return aggregate.merge_svd(experts, weights, self.lora.rank)
        return aggregate.merge_cat(experts, weights)

    def gateway_rank_alpha(self, num_experts: int) -> tuple[int, float]:
        """Rank and alpha of the gateway adapter; ``cat`` keeps alpha/r equal to the experts'."""
        if self.method == "cat":
            return self.lora.rank * num_experts, self.lora.alpha * num_experts
        return self.lora.rank, self.lora.alpha
