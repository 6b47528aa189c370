"""The worker's domain signature: computed once from local training data, sent as an aggregate.

Only the aggregate (mean and per-dimension variance of unit features over at least the
coordinator's ``min_count`` examples, optionally noised) leaves the machine; per-example
features never do. A dataset below the minimum, or a refusal by the coordinator, is
reported and the worker trains on without a signature (the router then falls back for
this domain); a coordinator that is briefly unavailable is retried by the caller.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any, Protocol

from fedmoe.client import ApiError
from fedmoe.data import Example
from fedmoe.featurizer import FeaturizerSettings
from fedmoe.signature import SignatureError, compute_signature

logger = logging.getLogger(__name__)

# Enough for a stable mean and variance; featurizing more only costs start-up time.
MAX_SIGNATURE_EXAMPLES = 2000


def sample_examples(examples: Sequence[Example], limit: int, seed: int = 0) -> list[Example]:
    """At most ``limit`` examples, a seeded sample when there are more."""
    if len(examples) <= limit:
        return list(examples)
    return random.Random(seed).sample(list(examples), limit)


class SignatureClient(Protocol):
    """What sending a signature uses of ``fedmoe.client.CoordinatorClient``."""

    def signatures(self) -> dict[str, Any]:
        """``GET /v1/signatures``."""
        ...

    def submit_signature(
        self, expert: str, *, worker_id: str, signature: dict[str, Any]
    ) -> dict[str, Any]:
        """``POST /v1/experts/{expert}/signature``."""
        ...


def share_signature(
    client: SignatureClient,
    *,
    worker_id: str,
    specialty: str,
    model: Any,
    tokenizer: Any,
    fingerprint: str,
    examples: Sequence[Example],
    noise: float = 0.0,
) -> dict[str, Any] | None:
    """Compute and send this worker's signature; the acknowledgement, or None if not sent.

    Transient coordinator errors (5xx, connection) propagate so that the caller retries.
    """
    try:
        offer = client.signatures()
    except ApiError as error:
        if error.transient:
            raise
        logger.warning("coordinator does not take domain signatures (%s); none sent", error)
        return None
    featurizer = FeaturizerSettings.from_dict(offer["featurizer"])
    min_count = int(offer["min_count"])
    try:
        signature = compute_signature(
            model,
            tokenizer,
            sample_examples(examples, MAX_SIGNATURE_EXAMPLES),
            featurizer,
            fingerprint,
            min_count=min_count,
            noise=noise,
        )
    except SignatureError as error:
        logger.error(
            "no domain signature sent for %s: %s; the router will not send requests to this "
            "expert until a worker with enough data sends one",
            specialty,
            error,
        )
        return None
    try:
        ack = client.submit_signature(specialty, worker_id=worker_id, signature=signature.to_dict())
    except ApiError as error:
        if error.transient:
            raise
        logger.error("the coordinator refused the domain signature of %s: %s", specialty, error)
        return None
    logger.info(
        "domain signature of %s sent (%d examples; %d in all from %s)",
        specialty,
        ack["count"],
        ack["expert_count"],
        ", ".join(ack["workers"]),
    )
    return ack
