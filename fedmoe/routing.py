"""The router: which expert should answer a request, from the experts' domain signatures.

Public API (``fedmoe serve`` and the gateway CLI call exactly this)::

    from fedmoe.routing import Router, RouteDecision
    router = Router({"sql_expert": sig_sql, "python_expert": sig_py})   # DomainSignature each
    router.featurizer            # FeaturizerSettings every request must be featurized with
    decision = router.route(features)            # one unit feature vector [hidden]
    decisions = router.route_batch(features)     # [n, hidden] -> list[RouteDecision]
    decisions = router.route_texts(model, tokenizer, ["SELECT ...", "def f():"])
    decision.expert      # the chosen expert, or None: fall back
    decision.fallback    # None when routed; "merged" (the cat gateway) or "mix"
    decision.weights     # {expert: weight} to serve with: {chosen: 1.0}, top-k mix, or {}
    decision.scores      # {expert: score}, higher is closer
    decision.margin      # top score minus the runner-up's
    decision.distance    # standardised distance to the top expert (about 1 in-domain)
    decision.ood         # subspace distance / the top expert's threshold (> 1: outside);
                         # None when its signature has no subspace (format 1) or the test is off
    decision.label       # the expert's name or "fallback:merged" / "fallback:mix"
    decision.to_dict()   # JSON-ready, for a response header or an extra field
    router.describe()    # JSON-ready settings for ``GET /v1/gateway``
    router.without(name) # the same router minus one expert

    # from a coordinator: GET /v1/signatures (CoordinatorClient.signatures()) holds the
    # signatures and the coordinator's decision settings; None while no expert has one
    router = router_from_payload(client.signatures())

A signature is built with ``fedmoe.signature.compute_signature`` (or
``DomainSignature.from_features``); requests must be featurized by the same base model
(``router.base_fingerprint``) with ``router.featurizer`` (``route_texts`` does this).

Scoring (``method``): ``"cosine"`` is the cosine between the request's unit feature and each
expert's mean, both centred on the count-weighted mean of all experts (what every domain
shares says nothing about which one a request belongs to); ``"gaussian"`` is the mean
per-dimension log-likelihood under each expert's diagonal Gaussian.

Decision: the top expert answers when it leads the runner-up by at least ``margin`` and the
request lies within its domain: the mean squared standardised distance to that expert's
mean (about 1 for the domain's own requests) is at most ``max_distance`` and, for a format 2
signature, its subspace distance (``fedmoe.ood``: a low-rank Mahalanobis distance that sees
the shape of the domain's spread, not only its width) is at most ``ood_factor`` times the
99th percentile of the domain's own distances, which the worker measured on its data and
sent with the signature. So a request far from every domain, e.g. one no expert has, falls
back. A format 1 signature (an older worker's) has only the diagonal bound, and the router
logs that once. The fallback is the merged gateway
(``"merged"``) or a weighted mix of the ``top_k`` best experts (``"mix"``, weights a
softmax of scores / ``temperature``).
``route`` is pure: no I/O, no model; ``route_texts`` featurizes with the base model first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, get_args

import torch

from fedmoe.featurizer import FeaturizerSettings, featurize
from fedmoe.fields import (
    DEFAULT_ROUTER_FALLBACK,
    DEFAULT_ROUTER_MARGIN,
    DEFAULT_ROUTER_MAX_DISTANCE,
    DEFAULT_ROUTER_OOD_FACTOR,
    RouterFallback,
)
from fedmoe.ood import VAR_FLOOR
from fedmoe.signature import DomainSignature, SignatureError

logger = logging.getLogger(__name__)

METHODS = ("cosine", "gaussian")
FALLBACKS: tuple[str, ...] = get_args(RouterFallback)
# Defaults chosen by benchmarks/routing_bench.py (see benchmarks/RESULTS.md).
DEFAULT_METHOD = "gaussian"
DEFAULT_MARGIN = DEFAULT_ROUTER_MARGIN
DEFAULT_MAX_DISTANCE = DEFAULT_ROUTER_MAX_DISTANCE
DEFAULT_FALLBACK = DEFAULT_ROUTER_FALLBACK
DEFAULT_OOD_FACTOR = DEFAULT_ROUTER_OOD_FACTOR
OPTION_NAMES = (
    "method",
    "margin",
    "max_distance",
    "fallback",
    "top_k",
    "temperature",
    "ood_factor",
)


@dataclass(frozen=True)
class RouteDecision:
    """Where one request goes and why."""

    expert: str | None
    scores: dict[str, float]
    margin: float
    fallback: str | None = None
    weights: dict[str, float] = field(default_factory=dict)
    distance: float = 0.0
    ood: float | None = None

    @property
    def routed(self) -> bool:
        """True when one expert answers alone."""
        return self.expert is not None

    @property
    def label(self) -> str:
        """The expert's name, or ``fallback:<kind>``, for logs and response headers."""
        return self.expert if self.expert is not None else f"fallback:{self.fallback}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (every field)."""
        return asdict(self)


class Router:
    """Routes unit feature vectors to experts by their :class:`DomainSignature`."""

    def __init__(
        self,
        signatures: Mapping[str, DomainSignature],
        *,
        method: str = DEFAULT_METHOD,
        margin: float = DEFAULT_MARGIN,
        max_distance: float | None = DEFAULT_MAX_DISTANCE,
        fallback: str = DEFAULT_FALLBACK,
        top_k: int = 2,
        temperature: float = 0.1,
        ood_factor: float = DEFAULT_OOD_FACTOR,
    ) -> None:
        if not signatures:
            raise ValueError("a router needs at least one expert signature")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        if margin < 0 or top_k < 1 or temperature <= 0 or ood_factor < 0:
            raise ValueError("margin must be >= 0, top_k >= 1, temperature > 0 and ood_factor >= 0")
        self.names = sorted(signatures)
        first = signatures[self.names[0]]
        for name in self.names[1:]:
            problems = first.compatible_with(signatures[name])
            if problems:
                raise SignatureError(f"signature of {name}: " + "; ".join(problems))
        self.signatures = dict(signatures)
        self.method, self.margin, self.max_distance = method, margin, max_distance
        self.fallback, self.top_k, self.temperature = fallback, top_k, temperature
        self.ood_factor = ood_factor
        self.featurizer: FeaturizerSettings = first.featurizer
        self.base_fingerprint = first.base_fingerprint
        self._prepare()

    def _prepare(self) -> None:
        means = torch.stack([self.signatures[n].mean.double() for n in self.names])
        counts = torch.tensor([float(self.signatures[n].count) for n in self.names])
        # With one expert there is nothing to tell apart, so nothing to centre on.
        self._center = (
            (counts[:, None] * means).sum(0) / counts.sum()
            if len(self.names) > 1
            else torch.zeros_like(means[0])
        )
        self._directions = torch.nn.functional.normalize(means - self._center, dim=-1)
        self._means = means
        floor = VAR_FLOOR / means.shape[-1]
        self._vars = torch.stack([self.signatures[n].var.double() for n in self.names]).clamp_min(
            floor
        )
        old = [n for n in self.names if self.signatures[n].subspace is None]
        if old and self.ood_factor > 0:
            logger.warning(
                "signature(s) of %s are format 1 (sent by an older worker, no subspace): "
                "out-of-domain requests near them are caught only by max_distance %s",
                ", ".join(old),
                self.max_distance,
            )

    def ood_ratios(self, features: torch.Tensor) -> torch.Tensor:
        """Subspace distance over each expert's threshold ``[n, experts]`` (NaN: no test)."""
        x = torch.nn.functional.normalize(_rows(features).double(), dim=-1)
        columns = []
        for name in self.names:
            signature = self.signatures[name]
            sub = signature.subspace
            if sub is None or self.ood_factor == 0:
                columns.append(torch.full((x.shape[0],), math.nan, dtype=torch.float64))
                continue
            threshold = max(self.ood_factor * sub.threshold, 1e-12)
            columns.append(sub.distance(x, signature.mean) / threshold)
        return torch.stack(columns, dim=1)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Scores ``[n, experts]`` (columns in ``self.names`` order) of ``[n, hidden]``."""
        x = _rows(features).double()
        if x.shape[-1] != self._means.shape[-1]:
            raise ValueError(
                f"features have dimension {x.shape[-1]}, signatures {self._means.shape[-1]}"
            )
        x = torch.nn.functional.normalize(x, dim=-1)
        if self.method == "cosine":
            return torch.nn.functional.normalize(x - self._center, dim=-1) @ self._directions.T
        diff = x[:, None, :] - self._means[None]
        return -0.5 * ((diff * diff) / self._vars[None] + self._vars.log()[None]).mean(-1)

    def route(self, features: torch.Tensor) -> RouteDecision:
        """The decision for one request's feature vector."""
        return self.route_batch(_rows(features))[0]

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Mean squared standardised distance ``[n, experts]`` to each expert's mean."""
        x = torch.nn.functional.normalize(_rows(features).double(), dim=-1)
        diff = x[:, None, :] - self._means[None]
        return ((diff * diff) / self._vars[None]).mean(-1)

    def route_batch(self, features: torch.Tensor) -> list[RouteDecision]:
        """One decision per row of ``features``."""
        scores, distances = self.scores(features), self.distances(features)
        ratios = self.ood_ratios(features)
        return [self._decide(*rows) for rows in zip(scores, distances, ratios)]

    def _decide(
        self, row: torch.Tensor, distance_row: torch.Tensor, ratio_row: torch.Tensor
    ) -> RouteDecision:
        scores = {name: float(row[i]) for i, name in enumerate(self.names)}
        ranked = sorted(scores, key=lambda name: -scores[name])
        best = scores[ranked[0]]
        margin = best - scores[ranked[1]] if len(ranked) > 1 else math.inf
        index = self.names.index(ranked[0])
        distance, ratio = float(distance_row[index]), float(ratio_row[index])
        ood = None if math.isnan(ratio) else ratio
        inside = (self.max_distance is None or distance <= self.max_distance) and (
            ood is None or ood <= 1.0
        )
        if margin >= self.margin and inside:
            return RouteDecision(ranked[0], scores, margin, None, {ranked[0]: 1.0}, distance, ood)
        if self.fallback == "merged":
            return RouteDecision(None, scores, margin, "merged", {}, distance, ood)
        top = ranked[: self.top_k]
        logits = torch.tensor([scores[n] for n in top], dtype=torch.float64) / self.temperature
        weights = torch.softmax(logits, dim=0).tolist()
        return RouteDecision(None, scores, margin, "mix", dict(zip(top, weights)), distance, ood)

    def route_texts(
        self, model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32
    ) -> list[RouteDecision]:
        """Featurize ``texts`` with the base model (adapters disabled) and route each."""
        features = featurize(model, tokenizer, texts, self.featurizer, batch_size=batch_size)
        return self.route_batch(features)

    def without(self, name: str) -> Router:
        """The same router without one expert (for leave-one-out measurements)."""
        rest = {n: s for n, s in self.signatures.items() if n != name}
        return Router(rest, **self.options())

    def options(self) -> dict[str, Any]:
        """The decision settings, as keyword arguments of the constructor."""
        return {
            "method": self.method,
            "margin": self.margin,
            "max_distance": self.max_distance,
            "fallback": self.fallback,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "ood_factor": self.ood_factor,
        }

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: settings, featurizer and each expert's example count."""
        return {
            **self.options(),
            "featurizer": self.featurizer.to_dict(),
            "base_fingerprint": self.base_fingerprint,
            "experts": {
                n: {"count": self.signatures[n].count, "format": self.signatures[n].format}
                for n in self.names
            },
        }


def _rows(features: torch.Tensor) -> torch.Tensor:
    """``[hidden]`` or ``[n, hidden]`` as ``[n, hidden]``."""
    return features.reshape(1, -1) if features.ndim == 1 else features


def router_from_payload(payload: Mapping[str, Any], **overrides: Any) -> Router | None:
    """A router from ``GET /v1/signatures`` JSON (None when no expert has a signature yet).

    ``payload["router"]`` holds the coordinator's decision settings; ``overrides`` win.
    """
    signatures = {
        name: DomainSignature.from_dict(dict(data))
        for name, data in dict(payload.get("signatures") or {}).items()
    }
    if not signatures:
        return None
    options = {**dict(payload.get("router") or {}), **overrides}
    return Router(signatures, **{k: v for k, v in options.items() if k in OPTION_NAMES})
