"""Removing a party: revoke a worker and rebuild its experts without its updates.

``Forgetter.forget(worker_id)`` first revokes the worker (durably: its token and its
registration are refused from then on), then rebuilds every expert it contributed to
from the initial adapter and the expert's write-ahead log (archived segments, then the
live ones): every record is replayed in order with the strategy that wrote it, except
the updates of every forgotten worker (this one and any before it: each rebuild starts
from scratch, so an earlier ``forget`` record is a no-op). Other workers' acknowledged
updates still in a FedBuff buffer stay in the rebuilt buffer.

The result is installed as the expert's next version through one fsynced ``forget``
log record whose body *is* the rebuilt float32 state and strategy state
(``fedmoe.coordinator.rebuilt``), so recovery after a crash at any point replays it bit
for bit; a snapshot follows. The log must reach back to lsn 1: with
``delta_retention=drop`` and segments retired, the rebuild is refused (409). Tests kill
the coordinator right after that record is fsynced with the crash point
``after-forget-append`` (``fedmoe.coordinator.crashpoints``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fedmoe import aggregate, fedavg_round
from fedmoe.coordinator import body_digest, crashpoints, errors
from fedmoe.coordinator.forget_book import ForgetBook
from fedmoe.coordinator.purge import purge_archive
from fedmoe.coordinator.rebuilt import encode_rebuilt
from fedmoe.coordinator.replay import Head, replay, replay_description
from fedmoe.coordinator.versions import Versioned
from fedmoe.coordinator.wal import ExpertLog, LogRecord
from fedmoe.schemas import ExpertForget, ForgetReport, ForgetRow
from fedmoe.server_strategy import StrategyState

if TYPE_CHECKING:
    from fedmoe.coordinator.core import CentralCoordinator

logger = logging.getLogger(__name__)


class UnknownPartyError(errors.CoordinatorError):
    """No worker of that id ever registered or sent an update (HTTP 404)."""


class WorkerForgottenError(errors.CoordinatorError):
    """The worker id was removed with ``fedmoe forget`` and may not come back (HTTP 409)."""


class LogUnavailableError(errors.CoordinatorError):
    """The log a rebuild needs was dropped (``delta_retention=drop``) (HTTP 409)."""


class Forgetter:
    """Revocations and rebuilds of one coordinator (its ``forgetting`` attribute)."""

    def __init__(self, coordinator: CentralCoordinator) -> None:
        self.coordinator = coordinator
        self.book = ForgetBook(coordinator.ledger.path)
        self._revoked = frozenset(self.book.revoked())
        self._lock = threading.Lock()  # one forget at a time
        self._settle_pending()

    def close(self) -> None:
        """Close the book's connection."""
        self.book.close()

    def _settle_pending(self) -> None:
        """Rows a crash left pending: done if their log record survived, else dropped."""
        lsns = self.coordinator.journal.lsns
        for seq, expert, lsn in self.book.pending():
            if lsns.get(expert, 0) >= lsn:  # recovery's snapshot has retired the log
                self._purge(expert, lsn)
                self.book.finish(seq)
            else:
                self.book.discard(seq)
                logger.warning(
                    "a forget of %s was cut short before its log record; run it again", expert
                )

    # --- checks the API makes ----------------------------------------------------------------

    def is_revoked(self, worker_id: str) -> bool:
        """Whether ``worker_id`` was forgotten (its token is refused)."""
        return worker_id in self._revoked

    def check_registration(self, worker_id: str) -> None:
        """Refuse to register a forgotten worker id again, whoever asks."""
        if worker_id in self._revoked:
            raise WorkerForgottenError(
                f"worker {worker_id!r} was removed with `fedmoe forget`; its id may not "
                "register again (use a new worker id)"
            )

    def rows(self, limit: int = 100) -> list[ForgetRow]:
        """The newest rebuilds, newest first."""
        return self.book.rows(limit)

    # --- forget --------------------------------------------------------------------------------

    def forget(self, worker_id: str) -> ForgetReport:
        """Revoke ``worker_id`` and rebuild every expert it contributed to without it."""
        with self._lock:
            if not self.book.known(worker_id):
                raise UnknownPartyError(f"no worker {worker_id!r} ever registered or uploaded")
            already = worker_id in self._revoked
            done = self.book.rebuilt(worker_id)
            names = [n for n in self.coordinator.settings.experts if n not in done]
            names = [n for n in names if n in self.book.contributed(worker_id)]
            for name in names:  # before anything changes: a refusal leaves all as it was
                self._check_log(name)
            self.book.revoke(worker_id)
            self._revoked = self._revoked | {worker_id}
            rebuilt = [self._rebuild(name, worker_id) for name in names]
        experts = [entry for entry in rebuilt if entry is not None]
        logger.info(
            "forgot worker %s: %d update(s) removed from %s",
            worker_id,
            sum(e.updates_removed for e in experts),
            [e.expert for e in experts],
        )
        return ForgetReport(
            worker_id=worker_id,
            revoked=True,
            already_forgotten=already,
            experts=experts,
            updates_removed=sum(e.updates_removed for e in experts),
            gateway_version=self.coordinator.gateway.version,
        )

    def _check_log(self, name: str) -> None:
        """Refuse when the expert's log no longer starts at its first record."""
        log = self.coordinator.journal.logs[name]
        first = next(iter(log.all_records()), None)
        lsn = self.coordinator.journal.lsns[name]
        if (first is None and lsn > 0) or (first is not None and _version_before(first) != 0):
            raise LogUnavailableError(
                f"cannot rebuild {name}: its write-ahead log no longer reaches back to the "
                "initial adapter (delta_retention=drop retired it, or the state dir predates "
                "the log); nothing was changed"
            )
        if first is not None and first.lsn != 1:
            raise LogUnavailableError(
                f"cannot rebuild {name}: its log starts at record {first.lsn}, the older "
                "deltas were dropped (delta_retention=drop); nothing was changed"
            )

    def _rebuild(self, name: str, worker_id: str) -> ExpertForget | None:
        """Rebuild ``name`` without the forgotten workers and install it as a new version."""
        coordinator, journal = self.coordinator, self.coordinator.journal
        with coordinator._expert_locks[name]:
            with journal._snapshot_locks[name]:  # no segment is retired while we read
                head, removed = self._replay_without(name, worker_id)
            if not removed:
                return None
            entry, seq = self._install(name, worker_id, head, removed)
            journal.logs[name].roll()
            journal.snapshot(name, Head(coordinator.experts[name], head.state, entry.lsn))
            self._purge(name, entry.lsn)
            self.book.finish(seq)
        return entry

    def _purge(self, name: str, lsn: int) -> None:
        """Drop the forgotten workers' bodies (and older rebuilds') from the archived log."""
        journal = self.coordinator.journal
        with journal._snapshot_locks[name]:  # no segment is retired into it meanwhile
            purge_archive(journal.logs[name], self._revoked, lsn)

    def _replay_without(self, name: str, worker_id: str) -> tuple[Head, list[str]]:
        """The expert from its initial adapter and its log without forgotten workers; the
        update ids of ``worker_id`` left out."""
        coordinator = self.coordinator
        initial = coordinator.initial
        start = Versioned(0, initial, aggregate.max_abs(initial), name=name)
        head, removed = Head(start, StrategyState(), 0), []
        for record in _contiguous(coordinator.journal.logs[name]):
            kind = record.header["kind"]
            skip = kind == "forget" or (kind == "flush" and head.state.buffer is None)
            if kind == "update":
                sender = record.header["ledger"]["worker_id"]
                skip = sender in self._revoked
                if sender == worker_id:
                    removed.append(str(record.header["ledger"]["update_id"]))
            if skip:
                head = Head(head.expert, head.state, record.lsn)
            else:
                head = replay(head, record, coordinator.schema, name)
        return head, removed

    def _install(
        self, name: str, worker_id: str, head: Head, removed: list[str]
    ) -> tuple[ExpertForget, int]:
        """Log the rebuilt state as the next version (one fsync), commit, publish; the entry
        and its pending ``forgets`` row."""
        coordinator, journal = self.coordinator, self.coordinator.journal
        # the rebuild is a version of its own: a FedAvg round open in the replay cannot close
        params, state = head.expert.state, fedavg_round.ended(head.state)
        old = coordinator.experts[name]
        lsn, version = journal.lsns[name] + 1, old.version + 1
        bound = aggregate.max_abs(params)
        entry = ExpertForget(
            expert=name,
            old_version=old.version,
            new_version=version,
            updates_removed=len(removed),
            update_ids=removed,
            lsn=lsn,
        )
        body = encode_rebuilt(params, state)
        header = self._header(entry, worker_id, body)
        row = ForgetRow(**entry.model_dump(), seq=0, worker_id=worker_id, created_at=time.time())
        seq = self.book.begin(row)
        with coordinator._commit_lock:
            experts = {**coordinator.experts, name: Versioned(version, params, bound, name=name)}
            built_from = coordinator._built_from(experts)
            gateway = coordinator._gateway(coordinator.gateway.version + 1, built_from, experts)
            appended = journal.logs[name].append(header, body)
            crashpoints.reached("after-forget-append")
            try:
                coordinator.ledger.commit_flush(name, version, gateway.version, built_from)
            except BaseException:
                journal.logs[name].undo(appended)
                self.book.discard(seq)
                raise
            journal.committed(name)
            journal.recent[name].clear()  # incremental pulls cannot cross a rebuild
            coordinator.experts, coordinator.gateway = experts, gateway
            if coordinator.settings.eager_gateway:
                coordinator.store.save_gateway_later(gateway)
        coordinator.strategies.publish(name, state, lsn)
        logger.info("rebuilt %s without %s: v%d -> v%d", name, worker_id, old.version, version)
        return entry, seq

    def _header(self, entry: ExpertForget, worker_id: str, body: bytes) -> dict[str, Any]:
        return {
            "lsn": entry.lsn,
            "kind": "forget",
            "version": entry.new_version,
            "strategy": replay_description(self.coordinator.strategies.strategy),
            "worker_id": worker_id,
            "forgotten": sorted(self._revoked),
            "removed": entry.update_ids,
            body_digest.KEY: body_digest.body_digest(body),
        }


def _version_before(record: LogRecord) -> int:
    """The expert's version before ``record`` was applied."""
    header = record.header
    moved = header["kind"] != "update" or bool(header.get("applied"))
    return int(header["version"]) - (1 if moved else 0)


def _contiguous(log: ExpertLog) -> Iterator[LogRecord]:
    """Every record of ``log`` from lsn 1, refusing a gap (a dropped segment)."""
    expected = 1
    for record in log.all_records():
        if record.lsn != expected:
            raise LogUnavailableError(
                f"the log of {log.directory.name} jumps to record {record.lsn} where "
                f"{expected} was expected; the expert cannot be rebuilt"
            )
        expected += 1
        yield record
