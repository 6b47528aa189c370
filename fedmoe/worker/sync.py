"""The worker's side of the sync protocol, free of models and sockets so it can be unit tested.

The worker uploads Δ = local − pulled with the version it pulled, then pulls the expert's
newest version and *rebases* onto it, keeping the training it did while the upload was in
flight (local ← newest + (local − snapshot)). An upload that never reached the coordinator
(connection refused) is dropped and re-made, bigger, next time; an upload whose fate is
unknown is retried with the same update id, which the coordinator applies at most once.

A sync has three phases: ``capture`` (training thread: copy the adapter and the window),
``exchange`` (any thread: encode, upload, pull; never touches the adapter) and ``finish``
(training thread: settle the window and rebase the adapter). ``sync()`` runs them inline;
``start()``/``poll()``/``wait()`` run the exchange on one background thread, so training
goes on while the network works (at most one sync in flight).

A sole worker's new expert is pulled + weight·Δ: the worker rebuilds it from the
acknowledgement (weight, version, ``state_sha256``). When other updates came in between it
asks for the steps since its pull (``fedmoe.deltas``, the coordinator may answer with the
full expert instead), rebuilds and checks the digest; a mismatch means a full pull.

``Syncer`` talks to the coordinator through ``SyncClient`` (what it uses of
``CoordinatorClient``), reads and writes the adapter through ``AdapterSlot`` and tells time
through ``Clock`` (those Protocols live in ``fedmoe.worker.sync_seams`` and are re-exported
here); tests pass in-memory fakes of all three.
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import httpx

from fedmoe.adapters import decode_adapter, encode_adapter
from fedmoe.aggregate import AdapterState, apply_update
from fedmoe.client import ApiError
from fedmoe.deltas import rebuild
from fedmoe.schemas import UpdateAck
from fedmoe.state_digest import state_digest
from fedmoe.worker.progress import PendingUpdate, WorkerStats
from fedmoe.worker.slots import rebase_slot, snapshot_into
from fedmoe.worker.sync_seams import (
    AdapterSlot,
    Capture,
    Clock,
    FatalSyncError,
    SyncClient,
    SyncIdentity,
    SystemClock,
    wait_for,
)

__all__ = [
    "AdapterSlot",
    "Capture",
    "Clock",
    "FatalSyncError",
    "SyncClient",
    "SyncIdentity",
    "Syncer",
    "SystemClock",
    "wait_for",
]

logger = logging.getLogger(__name__)


class Syncer:
    """Upload, acknowledge and rebase for one worker; all sync state lives here.

    Only the training thread calls ``capture``, ``finish``, ``start``, ``poll`` and
    ``wait``; while an exchange is in flight the training thread touches nothing here
    but ``in_flight``/``poll``, so the background thread needs no locks.
    """

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
        self._settled: list[PendingUpdate] = []  # acknowledged or refused, window not settled
        self._rebase_since: AdapterState | None = None  # rebase onto ``pulled`` at finish()
        # the snapshot's buffers, allocated once (at the first pull) and reused by every
        # capture: the exchange reads them only until it has made its delta, and the next
        # capture comes after that exchange was collected (one sync in flight)
        self._buffers: AdapterState = {}
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future[bool] | None = None

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
            self._fetch(since=self.pulled)
        self.run_id = answer.run_id

    def _pull(self) -> tuple[int, AdapterState]:
        return self.client.expert_adapter(self.identity.specialty, self.identity.tensor_shapes)

    def pull_and_reset(self) -> None:
        """Start from the expert's newest version (the adapter is overwritten)."""
        self.base_version, self.pulled = self._pull()
        self.adapter.load(self.pulled)
        if not self._buffers:  # touched now, at start-up, not by the first sync
            self._buffers = {key: tensor.clone() for key, tensor in self.pulled.items()}

    def pull_and_rebase(self, since: AdapterState) -> None:
        """Move onto the newest expert now, keeping what was trained after ``since``."""
        self._fetch(since)
        self.finish()

    def _fetch(self, since: AdapterState) -> None:
        """Pull the newest expert; ``finish()`` rebases the adapter onto it."""
        version, newest = self._pull()
        self.stats.full_pulls += 1
        self.stats.bytes_down += sum(t.numel() * 4 for t in newest.values())  # float32 tensors
        self._adopt(version, newest, since)

    def _adopt(self, version: int, newest: AdapterState, since: AdapterState) -> None:
        self.base_version, self.pulled, self._rebase_since = version, newest, since

    # --- the three phases of a sync --------------------------------------------------------

    def capture(self) -> Capture:
        """Training thread: copy the adapter (only if a new delta is due) and the window."""
        needs_delta = self.pending is None and self.unrebased is None
        stats = self.stats
        return Capture(
            local=snapshot_into(self.adapter, self._buffers) if needs_delta else None,
            tokens=stats.window_tokens,
            loss_count=len(stats.window_losses),
            train_loss=stats.window_loss(),
            dp_epsilon=stats.dp_epsilon,
        )

    def finish(self) -> None:
        """Training thread: settle acknowledged windows; rebase (local ← newest + progress)."""
        for pending in self._settled:
            self.stats.settle(pending)
        self._settled.clear()
        since, self._rebase_since = self._rebase_since, None
        if since is not None:  # (local − since) + newest, in place where the slot can
            rebase_slot(self.adapter, since, self.pulled)

    def exchange(self, capture: Capture) -> bool:
        """Upload and pull (never touching the adapter); False if it must be retried."""
        try:
            self._sync_once(capture)
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
        self.backoff = 1.0
        self.next_sync_at = self.clock.now() + self.sync_interval
        return True

    # --- inline and background drivers -----------------------------------------------------

    def due(self) -> bool:
        """True when the schedule (or a retry's backoff) says it is time to sync."""
        return self._future is None and self.clock.now() >= self.next_sync_at

    def schedule_first(self) -> None:
        """The first sync comes one interval after training starts."""
        self.next_sync_at = self.clock.now() + self.sync_interval

    def has_unsent(self) -> bool:
        """Anything trained, in flight or acknowledged-but-not-rebased is left."""
        return (
            bool(self.stats.window_tokens)
            or self.pending is not None
            or self.unrebased is not None
            or self._future is not None
        )

    def sync(self) -> bool:
        """Upload the delta and rebase onto the newest expert, blocking; False: retry later."""
        self.wait()  # never two exchanges at once
        began = self.clock.now()
        try:
            return self.exchange(self.capture())
        finally:
            self.finish()
            self.stats.blocked_seconds += self.clock.now() - began

    def start(self) -> None:
        """Capture now and run the exchange on the background thread (one at a time)."""
        if self._future is not None:
            raise RuntimeError("a sync is already in flight")
        began = self.clock.now()
        capture = self.capture()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmoe-sync")
        self._future = self._executor.submit(self.exchange, capture)
        self.stats.blocked_seconds += self.clock.now() - began

    def in_flight(self) -> bool:
        """A background exchange has been started and not collected yet."""
        return self._future is not None

    def poll(self) -> bool | None:
        """At a step boundary: None while in flight (or idle), else finish and its result."""
        if self._future is None or not self._future.done():
            return None
        return self._collect(self._future)

    def wait(self) -> bool | None:
        """Block until the exchange in flight is done and finish it (None if none)."""
        return None if self._future is None else self._collect(self._future)

    def _collect(self, future: Future[bool]) -> bool:
        began = self.clock.now()
        try:
            return future.result()  # re-raises FatalSyncError from the exchange
        finally:
            self._future = None
            self.finish()
            self.stats.blocked_seconds += self.clock.now() - began

    def close(self) -> None:
        """Wait for the exchange in flight (if any) and stop the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    # --- one exchange ----------------------------------------------------------------------

    def _schedule_retry(self, reason: str) -> None:
        self.stats.failed_syncs += 1
        logger.warning("%s; retrying in %.0fs", reason, self.backoff)
        self.next_sync_at = self.clock.now() + self.backoff
        self.backoff = min(self.backoff * 2, self.max_backoff)

    def _sync_once(self, capture: Capture) -> None:
        if self.unrebased is not None:  # an acknowledged upload whose pull failed
            self._fetch(since=self.unrebased)
            self.unrebased = None
            return
        if self.pending is None:
            if capture.local is None:  # cannot happen: capture() saw pending or unrebased
                raise RuntimeError("no adapter captured for a new delta")
            self.pending = self._make_pending(capture.local, capture)
        pending = self.pending
        try:
            ack = self._send(pending)
        except ApiError as error:
            if error.transient:
                raise  # not a refusal: exchange() retries the same update id later
            self._handle_refusal(error, pending)
            return
        self.pending, self.unrebased = None, pending.snapshot
        self._settled.append(pending)
        self._report(ack, pending)
        if not self._reproduce(ack, pending) and not self._pull_changes(ack, pending):
            self._fetch(since=pending.snapshot)
        self.unrebased = None

    def _reproduce(self, ack: UpdateAck, pending: PendingUpdate) -> bool:
        """If ours was the only update since our pull, rebuild the new expert without a
        download (pulled + weight·Δ, the coordinator's rule) and check its digest."""
        sole = ack.version == pending.base_version + 1 == self.base_version + 1
        if ack.state_sha256 is None or not sole:
            return False
        delta = decode_adapter(pending.body, self.identity.tensor_shapes)  # float32, as there
        newest = apply_update(self.pulled, delta, ack.weight)
        if not self._digest_matches(newest, ack.state_sha256, ack.version):
            return False
        self.stats.skipped_pulls += 1
        self._adopt(ack.version, newest, since=pending.snapshot)
        return True

    def _pull_changes(self, ack: UpdateAck, pending: PendingUpdate) -> bool:
        """Other updates came in too: download only the steps since our pull (or the full
        expert, when the coordinator says that is smaller), rebuild and check the digest."""
        shapes = self.identity.tensor_shapes
        changes = self.client.expert_changes(
            self.identity.specialty, shapes, since=self.base_version, exclude=pending.update_id
        )
        self.stats.bytes_down += changes.size
        if changes.steps is None:
            assert changes.state is not None, "a full answer has the state"
            self.stats.full_pulls += 1
            self._adopt(changes.version, changes.state, since=pending.snapshot)
            return True
        own = {pending.update_id: decode_adapter(pending.body, shapes)}
        newest = rebuild(self.pulled, changes.steps, own)
        if not self._digest_matches(newest, changes.digest, changes.version):
            return False
        self.stats.incremental_pulls += 1
        self._adopt(changes.version, newest, since=pending.snapshot)
        return True

    def _digest_matches(self, rebuilt: AdapterState, digest: str | None, version: int) -> bool:
        """Whether our rebuild of expert ``version`` is the coordinator's (else: a full pull)."""
        if digest is not None and state_digest(rebuilt) == digest:
            return True
        self.stats.digest_mismatches += 1
        logger.warning("expert v%d differs from our rebuild of it; pulling it", version)
        return False

    def _send(self, pending: PendingUpdate) -> UpdateAck:
        self.stats.bytes_up += len(pending.body)
        return self.client.upload(
            self.identity.specialty,
            pending.body,
            worker_id=self.identity.worker_id,
            update_id=pending.update_id,
            base_version=pending.base_version,
            num_tokens=pending.tokens,
            train_loss=pending.train_loss,
            dp_epsilon=pending.dp_epsilon,
        )

    def _make_pending(self, local: AdapterState, capture: Capture) -> PendingUpdate:
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
            tokens=capture.tokens,
            loss_count=capture.loss_count,
            train_loss=capture.train_loss,
            snapshot=snapshot,
            dp_epsilon=capture.dp_epsilon,
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
        self._settled.append(pending)
        self._fetch(since=pending.snapshot)

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
        """Final upload, inline: at most ``attempts`` syncs (with backoff) until nothing is left."""
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
