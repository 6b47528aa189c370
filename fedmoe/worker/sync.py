"""The worker's side of the sync protocol, free of models and sockets so it can be unit tested.

What one exchange does (upload Δ with the version pulled, then rebuild or pull the newest
expert and rebase onto it) is ``fedmoe.worker.sync_state``; this module decides when it
runs and what a failure means. An upload that never reached the coordinator (connection
refused) is dropped and re-made, bigger, next time; an upload whose fate is unknown is
retried with the same update id, which the coordinator applies at most once. Retries back
off exponentially up to ``max_backoff``.

A sync has three phases: ``capture`` (training thread: copy the adapter and the window),
``exchange`` (any thread: encode, upload, pull; never touches the adapter) and ``finish``
(training thread: settle the window and rebase the adapter). ``sync()`` runs them inline;
``start()``/``poll()``/``wait()`` run the exchange on one background thread, so training
goes on while the network works (at most one sync in flight).

``Syncer`` talks to the coordinator through ``SyncClient`` (what it uses of
``CoordinatorClient``), reads and writes the adapter through ``AdapterSlot`` and tells time
through ``Clock`` (Protocols in ``fedmoe.worker.sync_seams``); tests pass in-memory fakes
of all three.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import httpx

from fedmoe.client import ApiError
from fedmoe.worker.sync_seams import Capture, FatalSyncError
from fedmoe.worker.sync_state import SyncState

logger = logging.getLogger(__name__)


class Syncer(SyncState):
    """Upload, acknowledge and rebase for one worker: when, on which thread, and retries.

    Only the training thread calls ``capture``, ``finish``, ``start``, ``poll`` and
    ``wait``; while an exchange is in flight the training thread touches nothing here
    but ``in_flight``/``poll``, so the background thread needs no locks.
    """

    # the background thread (made at the first start()) and the exchange in flight; every
    # instance sets its own when it has one, these are the "none yet" values
    _executor: ThreadPoolExecutor | None = None
    _future: Future[bool] | None = None

    # --- one exchange and its retries ------------------------------------------------------

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
        self.next_sync_at = self._next_after(capture)
        return True

    def _schedule_retry(self, reason: str) -> None:
        self.stats.failed_syncs += 1
        logger.warning("%s; retrying in %.0fs", reason, self.backoff)
        self.next_sync_at = self.clock.now() + self.backoff
        self.backoff = min(self.backoff * 2, self.max_backoff)

    # --- inline and background drivers -----------------------------------------------------

    def due(self) -> bool:
        """True when the schedule (or a retry's backoff) says it is time to sync."""
        return self._future is None and self.clock.now() >= self.next_sync_at

    def schedule_first(self) -> None:
        """The first sync comes one interval after training starts or, with a round clock,
        at the first round boundary at least half an interval away."""
        wait = self._until_next_round()
        if wait < self.sync_interval / 2:
            wait += self.sync_interval
        self.next_sync_at = self.clock.now() + wait

    def _next_after(self, capture: Capture) -> float:
        """When the sync after ``capture``'s is due: at the next boundary of the round clock
        or, without one, one interval after this one was due, so that an exchange that
        takes seconds (a 7B adapter on a 1 Gbit/s link) does not stretch the period. A sync
        taken early (an inline sync) or an interval or more late starts the cadence anew."""
        if self.round_phase is not None:
            return self.clock.now() + self._until_next_round()
        due, taken = capture.due_at, capture.taken_at
        on_schedule = due <= taken < due + self.sync_interval
        return (due if on_schedule else taken) + self.sync_interval

    def _until_next_round(self) -> float:
        """Seconds to the next sync: one interval, or to the next boundary of the round
        clock (``round_phase``), where every worker with the same interval syncs."""
        if self.round_phase is None:
            return self.sync_interval
        return self.sync_interval - self.round_phase() % self.sync_interval

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
        capture = replace(self.capture(), pull_wait=self.pull_wait)
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

    def flush(self, *, attempts: int) -> None:
        """Final upload, inline: at most ``attempts`` syncs (with backoff) until nothing is
        left; each says it is the last (the coordinator stops counting this worker active)."""
        self.leaving = True
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
