"""One worker's sync state and the steps of one exchange: upload Δ, acknowledge, rebase.

The worker uploads Δ = local − pulled with the version it pulled, then pulls the expert's
newest version and *rebases* onto it, keeping the training it did while the upload was in
flight (local ← newest + (local − snapshot)).

A sole worker's new expert is pulled + weight·Δ: the worker rebuilds it from the
acknowledgement (weight, version, ``state_sha256``). When other updates came in between it
asks for the steps since its pull (``fedmoe.deltas``, the coordinator may answer with the
full expert instead), rebuilds and checks the digest; a mismatch means a full pull.

A settled pull: when the acknowledgement says the other workers of the expert have yet to
send this round's updates (``settle_version`` above ``version``), a background exchange
asks for the steps once the expert reaches that version (at most ``pull_wait`` seconds),
so the next interval starts from the whole round, as after a synchronous FedAvg round,
while training goes on meanwhile.

:class:`SyncState` holds what a sync changes (the pulled expert and its version, the update
in flight, the windows to settle) and the steps that change it; when and on which thread
they run, and what a failed exchange means for the next one, is ``fedmoe.worker.sync``'s
``Syncer``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

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
)

logger = logging.getLogger(__name__)


class SyncState:
    """One worker's sync state and the steps of one exchange that move it.

    The state: the pulled expert and its version, the update in flight, the windows to
    settle, and when the next sync is due (``next_sync_at``, ``backoff``: ``Syncer`` sets
    them). ``capture`` and ``finish`` run on the training thread; ``_sync_once`` (one
    exchange: upload, acknowledge, rebuild or pull) never touches the adapter, so it may
    run on another thread while training goes on.
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
        pull_wait: float = 0.0,
        round_phase: Callable[[], float] | None = None,
    ) -> None:
        self.client, self.adapter, self.identity = client, adapter, identity
        self.stats, self.clock = stats, clock
        self.sync_interval, self.max_backoff = sync_interval, max_backoff
        self.pull_wait = pull_wait  # for background exchanges (``Syncer.start``)
        # seconds into the current round of a clock the workers share (None: each worker
        # syncs on its own cadence of one interval); see ``Syncer.schedule_first``
        self.round_phase = round_phase
        self.leaving = False  # the final upload: the coordinator stops counting us active
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

    # --- capture and finish: the training thread's two phases of a sync --------------------

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
            taken_at=self.clock.now(),
            due_at=self.next_sync_at,
        )

    def finish(self) -> None:
        """Training thread: settle acknowledged windows; rebase (local ← newest + progress)."""
        for pending in self._settled:
            self.stats.settle(pending)
        self._settled.clear()
        since, self._rebase_since = self._rebase_since, None
        if since is not None:  # (local − since) + newest, in place where the slot can
            rebase_slot(self.adapter, since, self.pulled)

    # --- one exchange ----------------------------------------------------------------------

    def _sync_once(self, capture: Capture) -> None:
        """One exchange: send the update in flight (or a new one), then move onto the newest."""
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
        wait = capture.pull_wait if _others_due(ack) else 0.0
        reproduced = not wait and self._reproduce(ack, pending)
        if not reproduced and not self._pull_changes(ack, pending, wait=wait):
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

    def _pull_changes(self, ack: UpdateAck, pending: PendingUpdate, *, wait: float) -> bool:
        """Other updates came in too (or are due within ``wait`` s: the coordinator answers
        once they are in): download only the steps since our pull (or the full expert,
        when the coordinator says that is smaller), rebuild and check the digest."""
        shapes = self.identity.tensor_shapes
        changes = self.client.expert_changes(
            self.identity.specialty,
            shapes,
            since=self.base_version,
            exclude=pending.update_id,
            wait_for=ack.settle_version if wait else None,
            wait=wait,
        )
        self.stats.bytes_down += changes.size
        if wait:
            settled = ack.settle_version is not None and changes.version >= ack.settle_version
            self.stats.settled_pulls += settled
            self.stats.partial_rounds += not settled
        if changes.steps is None:
            assert changes.state is not None, "a full answer has the state"
            self.stats.full_pulls += 1
            self._adopt(changes.version, changes.state, since=pending.snapshot)
            return True
        own = {pending.update_id: decode_adapter(pending.body, shapes)}
        newest = rebuild(self.pulled, changes.steps, own, self.base_version)
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
            final=self.leaving,
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


def _others_due(ack: UpdateAck) -> bool:
    """Whether the coordinator expects other workers' updates in this round (K > 1).

    Pulling once they are in, instead of at once, starts the next interval from the whole
    round, as a synchronous FedAvg round would, while training goes on meanwhile.
    """
    return ack.settle_version is not None and ack.settle_version > ack.version
