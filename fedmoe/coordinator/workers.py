"""Registered workers: looked up one by key, bounded in number, forgotten when idle."""

from __future__ import annotations

import logging
import threading
import time

from fedmoe.coordinator import errors
from fedmoe.coordinator.ledger import Ledger
from fedmoe.schemas import WorkerInfo

logger = logging.getLogger(__name__)


class WorkerRegistry:
    """The rules of worker identity over the ledger's ``workers`` table.

    A worker's expert is part of its identity (moving it needs ``may_change_expert``),
    at most ``max_workers`` are registered, and one not seen for ``worker_ttl`` seconds
    (0: never) counts as unknown and is removed at the next registration or status read.
    """

    def __init__(self, ledger: Ledger, *, max_workers: int, worker_ttl: float) -> None:
        self.ledger = ledger
        self.max_workers, self.worker_ttl = max_workers, worker_ttl
        self._lock = threading.Lock()  # the count is checked, then raised, atomically

    def admit(self, worker_id: str, specialty: str, *, may_change_expert: bool) -> None:
        """Register (or re-register) a worker for ``specialty``."""
        with self._lock:
            known = self.live(worker_id)
            if known is not None and known.specialty != specialty and not may_change_expert:
                raise errors.ForbiddenError(
                    f"worker {worker_id!r} is registered for {known.specialty!r}; moving it to "
                    f"{specialty!r} needs an admin token (or register a new worker id)"
                )
            if known is None:
                self._make_room(worker_id)
            self.ledger.upsert_worker(worker_id, specialty)

    def check(self, worker_id: str, expert: str) -> None:
        """Refuse an upload from an unknown worker or to another expert than its own."""
        worker = self.live(worker_id)
        if worker is None:
            raise errors.UnknownWorkerError(
                f"worker {worker_id!r} is not registered; POST /v1/workers first"
            )
        if worker.specialty != expert:
            raise errors.ForbiddenError(
                f"worker {worker_id!r} is registered for {worker.specialty!r}, not {expert!r}"
            )

    def live(self, worker_id: str) -> WorkerInfo | None:
        """The worker's row (a primary-key lookup), or None if unknown or idle too long."""
        worker = self.ledger.worker(worker_id)
        if worker is None or self.worker_ttl <= 0:
            return worker
        return None if worker.last_seen < time.time() - self.worker_ttl else worker

    def forget_idle(self) -> None:
        """Remove the workers not seen for ``worker_ttl`` seconds."""
        if self.worker_ttl > 0:
            forgotten = self.ledger.forget_workers(time.time() - self.worker_ttl)
            if forgotten:
                logger.info("forgot %d worker(s) not seen for %gs", forgotten, self.worker_ttl)

    def _make_room(self, worker_id: str) -> None:
        self.forget_idle()
        total = sum(self.ledger.worker_counts().values())
        if total >= self.max_workers:
            raise errors.TooManyWorkersError(
                f"cannot register {worker_id!r}: the coordinator has {total} workers, its "
                f"max_workers; workers idle for worker_ttl={self.worker_ttl:g}s are "
                "forgotten, or raise --max-workers"
            )
