"""Federated evaluation of the routed gateway: an ``extra_kinds`` entry of the evaluator.

On each federated evaluation the worker routes every local validation example by what its
request carries (``fedmoe.routed_eval.route_examples``, the router the coordinator serves
at ``GET /v1/signatures``), answers each with the adapter chosen (an expert as the
coordinator has it now, the merged gateway on a ``merged`` fallback, a weighted ``cat`` mix
on a ``mix`` fallback) and reports kind ``routed``: the loss per target token and the
share of its own examples the router sent to its own expert (``routing_accuracy``). Only
those aggregates leave the machine. Experts are downloaded with ``If-None-Match``, so an
unchanged expert costs a 304. Skipped (None) while no expert has a signature, or when the
signatures were made with another base model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fedmoe.adapters import decode_adapter
from fedmoe.batching import IGNORE_INDEX, TokenizedExample, count_trainable_tokens, tokenize_example
from fedmoe.client import ApiError
from fedmoe.config import LoraSettings
from fedmoe.data import Example
from fedmoe.evaluation import validation_loss
from fedmoe.routed_eval import accuracy, route_examples
from fedmoe.routing import RouteDecision, router_from_payload
from fedmoe.strategy import GatewayMerge
from fedmoe.worker.fed_eval import FederatedEvaluator, swapped_lora

if TYPE_CHECKING:
    from fedmoe.worker.job import WorkerJob

logger = logging.getLogger(__name__)


class RoutedClient(Protocol):
    """What the routed evaluation uses of ``fedmoe.client.CoordinatorClient``."""

    def signatures(self) -> dict[str, Any]:
        """``GET /v1/signatures``."""
        ...

    def download(self, path: str, etag: str | None = None) -> tuple[int, bytes | None, str]:
        """GET an adapter: (version, bytes or None when unchanged, etag)."""
        ...


class RoutedEvaluation:
    """Callable as an ``ExtraKind``: the routed gateway's loss and routing accuracy."""

    def __init__(
        self,
        *,
        client: RoutedClient,
        tokenizer: Any,
        examples: Sequence[Example],
        max_length: int,
        shapes: Mapping[str, tuple[int, ...]],
        lora: LoraSettings,
        fingerprint: str,
    ) -> None:
        self.client, self.tokenizer = client, tokenizer
        self.shapes, self.lora, self.fingerprint = dict(shapes), lora, fingerprint
        # The evaluator's own rule: examples with no trainable token are left out.
        pairs = [(e, tokenize_example(e, tokenizer, max_length=max_length)) for e in examples]
        kept = [(e, t) for e, t in pairs if any(x != IGNORE_INDEX for x in t.labels[1:])]
        self.examples = [e for e, _ in kept]
        self.tokenized = [t for _, t in kept]
        self._experts: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}  # name: (etag, state)

    @classmethod
    def for_job(cls, job: WorkerJob) -> RoutedEvaluation:
        """The routed evaluation of a set-up worker job (its first ``eval_max_examples``)."""
        if job.lora is None:
            raise RuntimeError("the worker job is not set up yet (no LoRA settings)")
        return cls(
            client=job.client,
            tokenizer=job.tokenizer,
            examples=job.eval_examples[: job.options.eval_max_examples],
            max_length=job.options.train.max_length,
            shapes=job.tensor_shapes,
            lora=job.lora,
            fingerprint=job.fingerprint,
        )

    def __call__(self, evaluator: FederatedEvaluator) -> dict[str, Any] | None:
        """The ``routed`` result, or None while there is no router to evaluate.

        A failure is logged and leaves the kind out, so the expert's and the gateway's
        numbers are still reported.
        """
        try:
            return self.measure(evaluator)
        except Exception as error:  # best effort, like the rest of federated evaluation
            logger.warning("%s: routed evaluation failed: %r", evaluator.worker_id, error)
            return None

    def measure(self, evaluator: FederatedEvaluator) -> dict[str, Any] | None:
        """Route, evaluate each group under its adapter, and aggregate."""
        decisions = self.route(evaluator)
        if decisions is None:
            return None
        groups: dict[str, tuple[RouteDecision, list[TokenizedExample]]] = {}
        for decision, item in zip(decisions, self.tokenized, strict=True):
            groups.setdefault(_key(decision), (decision, []))[1].append(item)
        total, tokens = 0.0, 0
        for decision, items in groups.values():
            count = count_trainable_tokens(items)
            with swapped_lora(evaluator.model, self.state_for(decision, evaluator)):
                model: Any = evaluator.model
                total += validation_loss(model, items, pad_token_id=evaluator.pad_token_id) * count
            tokens += count
        return {
            "kind": "routed",
            "loss": total / max(tokens, 1),
            "routing_accuracy": accuracy(decisions, evaluator.expert),
        }

    def route(self, evaluator: FederatedEvaluator) -> list[RouteDecision] | None:
        """Each example's decision under the coordinator's router (None: no router)."""
        if not self.examples:
            return None
        try:
            router = router_from_payload(self.client.signatures())
        except ApiError as error:
            if error.transient:
                raise
            logger.info("no routed evaluation: the coordinator serves no signatures (%s)", error)
            return None
        if router is None:
            return None
        if router.base_fingerprint != self.fingerprint:
            logger.warning("no routed evaluation: signatures were made with another base model")
            return None
        return route_examples(router, evaluator.model, self.tokenizer, self.examples)

    def state_for(
        self, decision: RouteDecision, evaluator: FederatedEvaluator
    ) -> Mapping[str, torch.Tensor]:
        """The LoRA tensors that answer a decision (at our adapter's alpha/r)."""
        if decision.expert is not None:
            return self.expert(decision.expert)
        if decision.fallback == "mix" and decision.weights:
            merger = GatewayMerge(method="cat", lora=self.lora)  # cat keeps alpha/r
            states = [self.expert(name) for name in decision.weights]
            return merger.merge(states, list(decision.weights.values()))
        if evaluator.gateway_state is None:
            evaluator.gateway_state = evaluator.gateway()[1]
        return evaluator.gateway_state

    def expert(self, name: str) -> dict[str, torch.Tensor]:
        """An expert's tensors as the coordinator has them now (cached by ETag)."""
        etag, state = self._experts.get(name, ("", {}))
        _, body, new_etag = self.client.download(f"/v1/experts/{name}/adapter", etag or None)
        if body is not None:
            state = decode_adapter(body, self.shapes)
            self._experts[name] = (new_etag, state)
        return state


def _key(decision: RouteDecision) -> str:
    if decision.expert is not None:
        return f"expert:{decision.expert}"
    if decision.fallback == "mix":
        return "mix:" + ",".join(f"{n}={w:.6f}" for n, w in decision.weights.items())
    return "merged"
