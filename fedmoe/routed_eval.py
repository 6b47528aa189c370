"""Validation loss of the routed gateway: each example answered by the adapter its request
is routed to (the demo's ``gateway: routed`` row and its routing accuracy)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fedmoe.batching import TokenizedExample, count_trainable_tokens, tokenize_example
from fedmoe.data import Example
from fedmoe.evaluation import validation_loss
from fedmoe.featurizer import request_text
from fedmoe.routing import RouteDecision, Router


def route_examples(
    router: Router, model: Any, tokenizer: Any, examples: Sequence[Example]
) -> list[RouteDecision]:
    """Route every example by what its request carries (prompt, or start of its text)."""
    texts = [request_text(example, tokenizer) for example in examples]
    return router.route_texts(model, tokenizer, texts)


def routed_loss(
    decisions: Sequence[RouteDecision],
    examples: Sequence[Example],
    tokenizer: Any,
    model_for: Callable[[RouteDecision], tuple[str, Any]],
    *,
    max_length: int = 256,
) -> float:
    """Loss per target token when example i is answered by ``model_for(decisions[i])``.

    ``model_for`` returns ``(key, model)``; examples with the same key are evaluated together.
    """
    groups: dict[str, tuple[Any, list[TokenizedExample]]] = {}
    for decision, example in zip(decisions, examples, strict=True):
        key, model = model_for(decision)
        item = tokenize_example(example, tokenizer, max_length=max_length)
        groups.setdefault(key, (model, []))[1].append(item)
    total, tokens = 0.0, 0
    pad = int(tokenizer.pad_token_id)
    for model, items in groups.values():
        count = count_trainable_tokens(items)
        if count:
            total += validation_loss(model, items, pad_token_id=pad) * count
            tokens += count
    return total / max(tokens, 1)


def accuracy(decisions: Sequence[RouteDecision], domain: str) -> float:
    """Share of ``decisions`` that chose ``domain``'s expert."""
    return sum(d.expert == domain for d in decisions) / max(len(decisions), 1)
