"""``fedmoe-auto``: the router of ``fedmoe.routing`` in front of the loaded adapters.

Signatures come from the coordinator (``GET /v1/signatures``) or from ``router.json`` in
an exported directory; both hold the same JSON, read by ``router_from_payload``. The
router runs on the engine thread, since featurizing uses the served model with its
adapters disabled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from fedmoe.client import ApiError, CoordinatorClient
from fedmoe.routing import RouteDecision, Router, router_from_payload
from fedmoe.serve.models import AdapterEntry, ModelRegistry
from fedmoe.serve.service import RoutingDecision
from fedmoe.serve.settings import GATEWAY_MODEL

logger = logging.getLogger(__name__)
ROUTER_FILE = "router.json"


class ServeRouter:
    """Routes request texts to loaded adapters; a fallback goes to the merged gateway."""

    def __init__(self, router: Router, registry: ModelRegistry) -> None:
        self.router, self.registry = router, registry

    def route(self, texts: list[str]) -> list[RoutingDecision]:
        """One decision per text (engine thread: featurizes with the base model)."""
        model = BaseView(self.registry.require_model())
        decisions = self.router.route_texts(model, self.registry.tokenizer, texts)
        return [self._serve(decision) for decision in decisions]

    def _serve(self, decision: RouteDecision) -> RoutingDecision:
        """A ``mix`` fallback gets its weighted mix of experts; the rest see ``serve_decision``."""
        loaded = self.registry.entries()
        if decision.fallback == "mix" and decision.weights and set(decision.weights) <= set(loaded):
            mix = self.registry.ensure_mix(decision.weights)
            return RoutingDecision(mix, decision.scores, fallback=True)
        return serve_decision(decision, loaded)


class BaseView:
    """The served peft model seen as its base model: every row runs with ``__base__``.

    ``fedmoe.featurizer.featurize`` disables a peft model's adapters with
    ``disable_adapter()``, which walks every LoRA layer twice per call (about 20 ms of a
    36 ms routing call on the tiny model, measured in ``benchmarks.serve_bench``). peft's
    per-row ``adapter_names=["__base__"]`` gives the same base-only forward without
    touching the model's state. Only what ``featurize`` uses is exposed.
    """

    def __init__(self, model: Any) -> None:
        self._model = model
        self.config = model.config

    @property
    def training(self) -> bool:
        """Whether the wrapped model is in training mode."""
        return bool(self._model.training)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The wrapped model's parameters."""
        return iter(self._model.parameters())

    def eval(self) -> BaseView:
        """Put the wrapped model in eval mode."""
        self._model.eval()
        return self

    def train(self, mode: bool = True) -> BaseView:
        """Set the wrapped model's training mode."""
        self._model.train(mode)
        return self

    def __call__(self, *, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """A forward pass with no adapter on any row."""
        names = ["__base__"] * int(input_ids.shape[0])
        return self._model(input_ids=input_ids, adapter_names=names, **kwargs)


def serve_decision(decision: RouteDecision, loaded: Mapping[str, AdapterEntry]) -> RoutingDecision:
    """The adapter to generate with for a router decision.

    A routed expert answers alone. A ``merged`` fallback (or a ``mix`` naming experts not
    loaded) goes to the merged gateway, or, without one, to the best-scoring loaded expert.
    """
    if decision.expert is not None and decision.expert in loaded:
        return RoutingDecision(decision.expert, decision.scores)
    if GATEWAY_MODEL in loaded:
        return RoutingDecision(GATEWAY_MODEL, decision.scores, fallback=True)
    ranked = sorted(decision.scores, key=lambda name: -decision.scores[name])
    best = next((name for name in ranked if name in loaded), next(iter(loaded)))
    return RoutingDecision(best, decision.scores, fallback=True)


def router_from_dir(root: Path, **overrides: Any) -> Router | None:
    """The router saved in ``root/router.json`` (None when there is none)."""
    path = Path(root) / ROUTER_FILE
    if not path.exists():
        return None
    return router_from_payload(json.loads(path.read_text()), **overrides)


def router_from_coordinator(client: CoordinatorClient, **overrides: Any) -> Router | None:
    """The coordinator's router (None when it has no signatures or no such endpoint).

    ``overrides`` replace the coordinator's decision settings (e.g. ``fallback="mix"``).
    """
    payload = fetch_signatures(client)
    return router_from_payload(payload, **overrides) if payload else None


def fetch_signatures(client: CoordinatorClient) -> dict[str, Any] | None:
    """``GET /v1/signatures`` as JSON, or None when the coordinator has none (404)."""
    try:
        return client.signatures()
    except ApiError as error:
        if error.status_code == 404:
            return None
        raise
