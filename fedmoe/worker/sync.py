"""The worker's side of the sync protocol, free of models and sockets so it can be unit tested.

The worker uploads Δ = local − pulled with the version it pulled, then pulls the expert's
newest version and *rebases* onto it, keeping the training it did while the upload was in
flight (local ← newest + (local − snapshot)). An upload that never reached the coordinator
(connection refused) is dropped and re-made, bigger, next time; an upload whose fate is
unknown is retried with the same update id, which the coordinator applies at most once.

``Syncer`` talks to the coordinator through ``SyncClient`` (what it uses of
``CoordinatorClient``), reads and writes the adapter through ``AdapterSlot`` and tells time
through ``Clock``; tests pass in-memory fakes of all three.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx
import torch

from fedmoe.adapters import AdapterSchema, encode_adapter
from fedmoe.aggregate import AdapterState, apply_update
from fedmoe.client import ApiError
from fedmoe.schemas import RegistrationAck, SchemaInfo, UpdateAck
from fedmoe.worker.progress import PendingUpdate, WorkerStats

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

    def upload(
        self,
        expert: str,
        body: bytes,
        *,
        worker_id: str,
        update_id: str,
        base_version: int,
        num_tokens: int,
        train_loss: float | None,
    ) -> UpdateAck:
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


class Syncer:
    """Upload, acknowledge and rebase for one worker; all sync state lives here."""

    def __init__(
        self,
        client: SyncClient,
        adapter: AdapterSlot,
        identity: SyncIdentity,
        *,
        stats: WorkerStats,
        clock: Clock,
        sync_interval: float,
        max_backoff: float,
    ) -> None:
        self.client, self.adapter, self.identity = client, adapter, identity
        self.stats, self.clock = stats, clock
        self.sync_interval, self.max_backoff = sync_interval, max_backoff
        self.pending: PendingUpdate | None = None
        self.unrebased: AdapterState | None = None  # acknowledged, but the pull failed
        self.base_version = 0
        self.pulled: AdapterState = {}
        self.run_id: str | None = None
        self.backoff = 1.0
        self.next_sync_at = 0.0

    # --- registration and pulls ------------------------------------------------------------

    def register(self) -> None:
        """Register (again); a replaced coordinator state makes us re-pull and rebase."""
        ident = self.identity
        try:
            answer = self.client.register(
                worker_id=ident.worker_id,
                specialty=ident.specialty,
                fingerprint=ident.fingerprint,
                lora_config=ident.lora_config,
            )
        except ApiError as error:
            if error.transient:
                raise  # not a refusal: retried
            raise FatalSyncError(f"registration refused: {error}") from None
        if self.run_id is not None and answer.run_id != self.run_id:
            logger.warning(
                "coordinator state was replaced (run %s -> %s); re-pulling",
                self.run_id,
                answer.run_id,
            )
            self.pending = None
            self.pull_and_rebase(since=self.pulled)
        self.run_id = answer.run_id

    def _pull(self) -> tuple[int, AdapterState]:
        return self.client.expert_adapter(self.identity.specialty, self.identity.tensor_shapes)

    def pull_and_reset(self) -> None:
        """Start from the expert's newest version (the adapter is overwritten)."""
        self.base_version, self.pulled = self._pull()
        self.adapter.load(self.pulled)

    def pull_and_rebase(self, since: AdapterState) -> None:
        """Move onto the newest expert, keeping what was trained after ``since``."""
        version, newest = self._pull()
        local = self.adapter.state()
        progress = {key: local[key] - since[key] for key in local}
        self.adapter.load(apply_update(newest, progress, 1.0))
        self.base_version, self.pulled = version, newest

    # --- one sync --------------------------------------------------------------------------

    def due(self) -> bool:
        """True when the schedule (or a retry's backoff) says it is time to sync."""
        return self.clock.now() >= self.next_sync_at

    def schedule_first(self) -> None:
        """The first sync comes one interval after training starts."""
        self.next_sync_at = self.clock.now() + self.sync_interval

    def has_unsent(self) -> bool:
        """Anything trained, in flight or acknowledged-but-not-rebased is left."""
        return (
            bool(self.stats.window_tokens) or self.pending is not None or self.unrebased is not None
        )

    def sync(self) -> bool:
        """Upload the delta and rebase onto the newest expert; False if it must be retried."""
        began = self.clock.now()
        try:
            self._sync_once()
        except httpx.ConnectError as error:
            if self.pending is not None and not self.pending.maybe_delivered:
                self.pending = None  # it never arrived: next time we send the bigger delta
            self._schedule_retry(f"coordinator unreachable ({error})")
            return False
        except httpx.TransportError as error:
            if self.pending is not None:
                self.pending.maybe_delivered = True
            self._schedule_retry(f"upload's fate unknown ({error!r}); will resend the same id")
            return False
        except ApiError as error:
            if error.status_code in (401, 403):
                raise FatalSyncError(f"coordinator refused us: {error}") from None
            self._schedule_retry(f"coordinator error ({error})")
            return False
        finally:
            self.stats.blocked_seconds += self.clock.now() - began
        self.backoff = 1.0
        self.next_sync_at = self.clock.now() + self.sync_interval
        return True

    def _schedule_retry(self, reason: str) -> None:
        self.stats.failed_syncs += 1
        logger.warning("%s; retrying in %.0fs", reason, self.backoff)
        self.next_sync_at = self.clock.now() + self.backoff
        self.backoff = min(self.backoff * 2, self.max_backoff)

    def _sync_once(self) -> None:
        if self.unrebased is not None:  # an acknowledged upload whose pull failed
            self.pull_and_rebase(since=self.unrebased)
            self.unrebased = None
            return
        if self.pending is None:
            self.pending = self._make_pending()
        pending = self.pending
        try:
            ack = self._send(pending)
        except ApiError as error:
            if error.transient:
                raise  # not a refusal: sync() retries the same update id later
            self._handle_refusal(error, pending)
            return
        self.pending, self.unrebased = None, pending.snapshot
        self.stats.settle(pending)
        self._report(ack, pending)
        self.pull_and_rebase(since=pending.snapshot)
        self.unrebased = None

    def _send(self, pending: PendingUpdate) -> UpdateAck:
        return self.client.upload(
            self.identity.specialty,
            pending.body,
            worker_id=self.identity.worker_id,
            update_id=pending.update_id,
            base_version=pending.base_version,
            num_tokens=pending.tokens,
            train_loss=pending.train_loss,
        )

    def _make_pending(self) -> PendingUpdate:
        local = self.adapter.state()
        dtype = self.identity.upload_dtype
        delta = {key: (local[key] - self.pulled[key]).to(dtype) for key in local}
        # The snapshot is what the coordinator makes of this upload at weight 1 (staleness 0):
        # pulled + Δ as sent, bit for bit. It differs from ``local`` only by the rounding of
        # Δ, which the next rebase carries forward as progress instead of dropping it.
        snapshot = apply_update(self.pulled, {k: d.float() for k, d in delta.items()}, 1.0)
        return PendingUpdate(
            update_id=f"{self.identity.worker_id}:{uuid.uuid4().hex}",
            body=encode_adapter(delta),
            base_version=self.base_version,
            tokens=self.stats.window_tokens,
            loss_count=len(self.stats.window_losses),
            train_loss=self.stats.window_loss(),
            snapshot=snapshot,
        )

    def _handle_refusal(self, error: ApiError, pending: PendingUpdate) -> None:
        if error.code == "unknown_worker":
            logger.warning("coordinator does not know us (restarted?); registering again")
            self.register()
            return  # self.pending is kept (or cleared by a state change); retried next sync
        if error.status_code in (401, 403) or error.code == "incompatible_worker":
            raise FatalSyncError(f"coordinator refused {self.identity.worker_id}: {error}")
        logger.warning(
            "update %s refused (%s); dropping it and moving to the newest expert",
            pending.update_id,
            error,
        )
        self.pending = None
        self.stats.settle(pending)
        self.pull_and_rebase(since=pending.snapshot)

    def _report(self, ack: UpdateAck, pending: PendingUpdate) -> None:
        stats = self.stats
        stats.uploads += 1
        stats.last_staleness, stats.last_version = ack.staleness, ack.version
        elapsed = max(self.clock.now() - stats.started, 1e-9)
        loss = "n/a" if pending.train_loss is None else f"{pending.train_loss:.4f}"
        logger.info(
            "%s sync %d: loss %s, %.0f tok/s, %s v%d (staleness %d, weight %.3f), gateway v%d",
            self.identity.worker_id,
            stats.uploads,
            loss,
            stats.tokens / elapsed,
            self.identity.specialty,
            ack.version,
            ack.staleness,
            ack.weight,
            ack.gateway_version,
        )

    def flush(self, *, attempts: int) -> None:
        """Final upload: at most ``attempts`` syncs (with backoff) until nothing is left."""
        for _ in range(attempts):
            if not self.has_unsent():
                return
            try:
                if self.sync():
                    continue
            except FatalSyncError as error:
                logger.error("final upload impossible: %s", error)
                return
            self.clock.sleep(min(self.backoff, 5.0))
