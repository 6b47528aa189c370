"""What the worker's ``Syncer`` talks to: the coordinator client, the clock, the adapter.

``SyncClient``, ``Clock`` and ``AdapterSlot`` are Protocols so that unit tests pass
in-memory fakes; ``SystemClock`` is the real clock; ``wait_for`` retries a call while the
coordinator is unavailable. ``fedmoe.worker.sync`` re-exports all of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import httpx
import torch

from fedmoe.adapters import AdapterSchema
from fedmoe.aggregate import AdapterState
from fedmoe.client import ApiError, UploadFacts
from fedmoe.deltas import ExpertChanges
from fedmoe.schemas import RegistrationAck, SchemaInfo, UpdateAck

if TYPE_CHECKING:
    from typing_extensions import Unpack

logger = logging.getLogger(__name__)

T = TypeVar("T")


class FatalSyncError(RuntimeError):
    """The coordinator refused us in a way retrying cannot fix (auth, incompatibility)."""


class SyncClient(Protocol):
    """What a worker uses of ``fedmoe.client.CoordinatorClient``."""

    def schema(self) -> SchemaInfo:
        """``GET /v1/schema``."""
        ...

    def register(
        self, *, worker_id: str, specialty: str, fingerprint: str, lora_config: dict[str, Any]
    ) -> RegistrationAck:
        """``POST /v1/workers``."""
        ...

    def expert_adapter(self, name: str, schema: AdapterSchema) -> tuple[int, AdapterState]:
        """The expert's current version and float32 tensors."""
        ...

    def expert_changes(
        self,
        name: str,
        schema: AdapterSchema,
        since: int,
        exclude: str | None = None,
        *,
        wait_for: int | None = None,
        wait: float = 0.0,
    ) -> ExpertChanges:
        """What changed since version ``since``: the steps from it, or the full expert
        (once the expert is at ``wait_for``, or ``wait`` seconds have passed)."""
        ...

    def upload(self, expert: str, body: bytes, **facts: Unpack[UploadFacts]) -> UpdateAck:
        """``POST /v1/experts/{expert}/updates``."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class Clock(Protocol):
    """Monotonic time and waiting; ``stop`` cuts a wait short when it is set."""

    def now(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> None:
        """Wait ``seconds`` (less when ``stop`` gets set)."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic`` and real waits."""

    def now(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> None:
        """``stop.wait(seconds)``, or ``time.sleep`` when there is nothing to wake us."""
        if stop is None:
            time.sleep(seconds)
        else:
            stop.wait(seconds)


class AdapterSlot(Protocol):
    """The adapter being trained: read a float32 copy, or overwrite it in place."""

    def state(self) -> AdapterState:
        """A float32 copy of the current LoRA tensors under PEFT names."""
        ...

    def load(self, state: AdapterState) -> None:
        """Overwrite the LoRA tensors (optimizer state survives)."""
        ...


@dataclass(frozen=True)
class SyncIdentity:
    """Who this worker is to the coordinator and how its uploads are shaped."""

    worker_id: str
    specialty: str
    fingerprint: str
    lora_config: dict[str, Any]
    tensor_shapes: AdapterSchema
    upload_dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class Capture:
    """What the training thread hands a sync: the adapter (if needed) and the window."""

    local: AdapterState | None  # None when a pending upload or a rebase needs no new delta
    tokens: int
    loss_count: int
    train_loss: float | None
    dp_epsilon: float | None = None
    # seconds the exchange may wait for the round's other updates before it pulls (0 when
    # the training thread waits for the exchange: inline syncs and the final upload)
    pull_wait: float = 0.0
    taken_at: float = 0.0  # the clock when the training thread captured it
    due_at: float = 0.0  # when the schedule said this sync was due


def wait_for(
    call: Callable[[], T], *, clock: Clock, stop: threading.Event, max_backoff: float
) -> T:
    """Retry ``call`` with backoff while the coordinator is unreachable or answers 5xx."""
    delay = 1.0
    while True:
        try:
            return call()
        except (httpx.TransportError, ApiError) as error:
            refused = isinstance(error, ApiError) and not error.transient
            if refused or stop.is_set():
                raise
            logger.warning("coordinator unavailable (%s); retrying in %.0fs", error, delay)
            clock.sleep(delay, stop)
            delay = min(delay * 2, max_backoff)
