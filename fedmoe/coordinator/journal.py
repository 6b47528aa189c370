"""Durability of the experts: the write-ahead log, background snapshots and recovery.

An accepted update is durable after one fsync, the append of its log record
(``fedmoe.coordinator.wal``); its SQLite row is committed right after without an fsync
of its own. A *snapshot* of an expert is its float32 adapter file at some version plus
its strategy state file, both named by the last log record they include (``lsn``) and
made current by one fsynced ledger row (``snapshots``); it is written in the
background every ``snapshot_every_updates`` updates or ``snapshot_every_seconds``
seconds, on a clean close, and at start-up after a replay. After a snapshot the log
segments it covers are retired (archived or dropped, ``delta_retention``).

Recovery: the current snapshot, then every log record after its lsn replayed with the
strategy that wrote it (``fedmoe.coordinator.replay``), gives the float32 state the
coordinator had acknowledged, bit for bit; rows missing from SQLite are put back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fedmoe.adapters import AdapterSchema, Buffer
from fedmoe.aggregate import AdapterState
from fedmoe.coordinator import body_digest, crashpoints, errors, restore
from fedmoe.coordinator.ledger import Ledger
from fedmoe.coordinator.ledger_rows import SnapshotRow, UpdateRecord
from fedmoe.coordinator.replay import (
    Head,
    contribution_fields,
    ledger_fields,
    ledger_record,
    replay,
    replay_description,
)
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.store import AdapterStore
from fedmoe.coordinator.strategy_store import StrategyStore, describe, restore_states
from fedmoe.coordinator.versions import Versioned
from fedmoe.coordinator.wal import PREWRITE_MIN, Appended, ExpertLog, LogRecord, Prewritten
from fedmoe.server_strategy import Contribution, RoundClose, Strategy, StrategyState
from fedmoe.state_digest import state_digest

logger = logging.getLogger(__name__)

RECENT = 64  # index entries kept per expert for incremental pulls


@dataclass(frozen=True)
class LogEntry:
    """Where an applied update's body lies, for incremental pulls (``since=V``)."""

    lsn: int
    version: int  # the expert's version after it
    update_id: str
    weight: float
    segment: str
    body_offset: int
    body_len: int
    close: RoundClose | None = None  # how it closed a FedAvg round


class Journal:
    """Every expert's log, snapshot schedule and recovery."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        ledger: Ledger,
        store: AdapterStore,
        names: list[str],
        strategy: Strategy,
    ) -> None:
        self.settings, self.ledger, self.store = settings, ledger, store
        self.strategy_store = StrategyStore(settings.state_dir)
        keep = settings.delta_retention == "keep"
        root = settings.state_dir / "wal"
        self.logs = {name: ExpertLog(root / name, keep=keep) for name in names}
        self.lsns = dict.fromkeys(names, 0)
        self.recent: dict[str, deque[LogEntry]] = {n: deque(maxlen=RECENT) for n in names}
        self.snapshot_lsns = dict.fromkeys(names, 0)
        self._strategy = strategy
        self._description = replay_description(strategy)
        self._pending = dict.fromkeys(names, 0)  # records since the last snapshot
        self._oldest: dict[str, float | None] = dict.fromkeys(names, None)
        self._snapshot_locks = {name: threading.Lock() for name in names}
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        # writes big bodies ahead of their records (one at a time per expert: its lock)
        self._writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="wal-prewrite")

    # --- appends (under the expert's lock) ---------------------------------------------------

    def prewrite(self, name: str, body: Buffer) -> Prewritten | None:
        """Start writing the body of the expert's next record ahead of it (a big body only),
        so that appending the record later leaves only its header to write; ``append_update``
        with it, or ``discard``, must follow under the same hold of the expert's lock."""
        if len(body) < PREWRITE_MIN:
            return None
        return self.logs[name].prewrite(self.lsns[name] + 1, body, self._writer)

    def discard(self, name: str, prewritten: Prewritten | None) -> None:
        """Cut off a written-ahead body whose update was refused (nothing if it was logged)."""
        if prewritten is not None:
            self.logs[name].discard(prewritten)

    def append_update(
        self,
        record: UpdateRecord,
        contribution: Contribution,
        *,
        applied: bool,
        body: Buffer,
        prewritten: Prewritten | None = None,
        close: RoundClose | None = None,
    ) -> Appended:
        """Log an accepted update (its ledger row, what replay needs, the body); fsynced.
        ``prewritten``: the body was written ahead (``prewrite``), only the header is left;
        ``close``: how it closed a FedAvg round (replay recomputes it)."""
        name = record.expert
        header: dict[str, Any] = {
            "lsn": self.lsns[name] + 1,
            "kind": "update",
            "version": record.expert_version,
            "applied": applied,
            "strategy": self._description,
            "contribution": contribution_fields(contribution),
            "ledger": ledger_fields(record),
            body_digest.KEY: record.body_blake3,
        }
        appended = self.logs[name].append(header, body, prewritten)
        crashpoints.reached("after-append")
        if applied:
            assert record.expert_version is not None
            entry = LogEntry(
                header["lsn"],
                record.expert_version,
                record.update_id,
                record.weight,
                appended.segment,
                appended.body_offset,
                appended.body_len,
                close,
            )
            self.recent[name].append(entry)
        return appended

    def append_flush(self, name: str, version: int, lr: float) -> Appended:
        """Log a buffer applied by its timeout (no body: replay recomputes it)."""
        header = {
            "lsn": self.lsns[name] + 1,
            "kind": "flush",
            "version": version,
            "lr": lr,
            "strategy": self._description,
        }
        self.recent[name].clear()  # not a sum of uploads: incremental pulls start again
        return self.logs[name].append(header, b"")

    def undo(self, name: str, appended: Appended) -> None:
        """Remove a record whose SQLite commit failed (it was never acknowledged)."""
        self.logs[name].undo(appended)
        recent = self.recent[name]
        if recent and (recent[-1].segment, recent[-1].body_offset) == (
            appended.segment,
            appended.body_offset,
        ):
            recent.pop()

    def committed(self, name: str) -> None:
        """A logged record is committed: count it toward the next snapshot."""
        self.lsns[name] += 1
        with self._wake:
            self._pending[name] += 1
            if self._oldest[name] is None:
                self._oldest[name] = time.monotonic()
            if self._pending[name] >= self.settings.snapshot_every_updates:
                self._wake.notify()

    def read_body(self, name: str, entry: LogEntry) -> bytes:
        """The body of a logged update (live or archived segment)."""
        return self.logs[name].read_body(entry.segment, entry.body_offset, entry.body_len)

    # --- snapshots ---------------------------------------------------------------------------

    def snapshot(self, name: str, head: Head) -> bool:
        """Write ``head`` as the expert's snapshot, make it current, retire the log it covers.

        ``roll()`` must have been called on the expert's log when ``head`` was taken.
        """
        with self._snapshot_locks[name]:
            if head.lsn <= self.snapshot_lsns[name]:
                self.logs[name].retire(head.lsn)  # a retirement a crash cut short
                return False
            expert = head.expert
            if not self.store.expert_path(name, expert.version).exists():
                self.store.save_payload(name, expert.version, expert.payload)
            has_state = not head.state.empty
            if has_state:
                self.strategy_store.save(name, head.lsn, head.state)
            crashpoints.reached("mid-snapshot")
            description = json.dumps(self._description, sort_keys=True)
            row = SnapshotRow(name, head.lsn, expert.version, description, has_state)
            self.ledger.set_snapshot(row)
            self.snapshot_lsns[name] = head.lsn
            self.logs[name].retire(head.lsn)
            self.store.prune_expert(name, expert.version)
            self.strategy_store.prune(name, head.lsn if has_state else -1)
            logger.info("snapshot of %s at v%d (log lsn %d)", name, expert.version, head.lsn)
            return True

    def start(self, capture: Callable[[str], Head]) -> None:
        """Run the background snapshot thread; ``capture`` takes an expert's head (and rolls
        its log) under the expert's lock."""
        self._thread = threading.Thread(
            target=self._loop, args=(capture,), name="snapshot-writer", daemon=True
        )
        self._thread.start()

    def _due(self) -> list[str]:
        now, every = time.monotonic(), self.settings.snapshot_every_seconds
        return [
            name
            for name, count in self._pending.items()
            if count >= self.settings.snapshot_every_updates
            or (count and now - (self._oldest[name] or now) >= every)
        ]

    def _loop(self, capture: Callable[[str], Head]) -> None:
        period = min(1.0, self.settings.snapshot_every_seconds / 4)
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closing or bool(self._due()), period)
                if self._closing:
                    return
                due = self._due()
                for name in due:
                    self._pending[name], self._oldest[name] = 0, None
            for name in due:
                try:
                    self.snapshot(name, capture(name))
                except Exception:  # e.g. a full disk: the log still holds everything
                    logger.exception("could not write the snapshot of %s", name)
                    with self._wake:
                        self._pending[name] += 1
                        self._oldest[name] = self._oldest[name] or time.monotonic()

    def stop(self) -> None:
        """Stop the background snapshot thread (a snapshot in progress finishes)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._writer.shutdown()

    def close(self, capture: Callable[[str], Head]) -> None:
        """Stop the background thread and snapshot every expert with logged records."""
        self.stop()
        for name in self.logs:
            if self.lsns[name] > self.snapshot_lsns[name]:
                try:
                    self.snapshot(name, capture(name))
                except Exception:  # the next start replays the log past the last snapshot
                    logger.exception("could not write the snapshot of %s", name)

    # --- recovery ----------------------------------------------------------------------------

    def recover(
        self, initial: AdapterState, schema: AdapterSchema
    ) -> tuple[dict[str, Versioned], dict[str, StrategyState]]:
        """Every expert at its last acknowledged state: snapshot + log replay."""
        snapshots, experts, states = self.ledger.snapshot_rows(), {}, {}
        for name in self.logs:
            row = snapshots.get(name) or self._first_snapshot(name, initial)
            head = self._load(row, schema)
            head, replayed = self._replay_log(name, head, schema)
            head = self._check_strategy(name, head, replayed[-1] if replayed else row)
            self.lsns[name] = head.lsn
            self.logs[name].roll()
            self.snapshot(name, head)
            experts[name], states[name] = head.expert, head.state
            logger.info("expert %s at version %d", name, head.expert.version)
        restore.warn_unserved(self.ledger, list(self.logs))
        return experts, states

    def _first_snapshot(self, name: str, initial: AdapterState) -> SnapshotRow:
        """The snapshot of a new expert, or of a state dir written before the log existed."""
        version = self.ledger.expert_rows().get(name, {}).get("version")
        if version is None:
            self.store.save_expert(name, 0, initial)
            self.ledger.add_expert(name)
            version = 0
        states, _ = restore_states(self.ledger, self.strategy_store, [name], self._strategy)
        has_state = not states[name].empty
        if has_state:
            self.strategy_store.save(name, 0, states[name])
        description = json.dumps(self._description, sort_keys=True)
        row = SnapshotRow(name, 0, version, description, has_state)
        self.ledger.set_snapshot(row)
        return row

    def _load(self, row: SnapshotRow, schema: AdapterSchema) -> Head:
        expert = restore.load_expert(self.store, row.expert, row.version, schema)
        state = StrategyState()
        if row.has_state:
            try:
                state = self.strategy_store.load(row.expert, row.lsn)
            except (OSError, ValueError, KeyError) as error:
                raise errors.StateDirError(
                    f"cannot restore the strategy state of {row.expert} from "
                    f"{self.strategy_store.path(row.expert, row.lsn)}: {error}"
                ) from None
        self.snapshot_lsns[row.expert] = row.lsn
        return Head(expert, state, row.lsn)

    def _replay_log(
        self, name: str, head: Head, schema: AdapterSchema
    ) -> tuple[Head, list[LogRecord]]:
        replayed: list[LogRecord] = []
        rows: list[UpdateRecord] = []
        for record in self.logs[name].records():
            if record.lsn <= head.lsn:
                continue  # in the snapshot already (its segment's retirement was cut short)
            if record.lsn != head.lsn + 1:
                raise errors.StateDirError(
                    f"the log of {name} jumps from lsn {head.lsn} to {record.lsn}; "
                    "restore the state dir from a backup"
                )
            head = replay(head, record, schema, name)
            replayed.append(record)
            if record.header["kind"] == "update":
                rows.append(self._row(record, head))
        missing = self.ledger.restore_logged(rows, name, head.expert.version)
        if replayed:
            logger.warning(
                "%s: replayed %d logged record(s) after the snapshot at lsn %d (%d ledger "
                "row(s) restored)",
                name,
                len(replayed),
                replayed[0].lsn - 1,
                missing,
            )
        return head, replayed

    def _row(self, record: LogRecord, head: Head) -> UpdateRecord:
        """The ledger row and acknowledgement of a replayed update, as first answered (the
        digest of a staleness-0 update is remade, only for a row SQLite lost)."""
        row = ledger_record(record.header)
        missing = self.ledger.accepted_update(row.update_id) is None
        if missing and row.staleness == 0 and not row.buffered:
            row.state_sha256 = state_digest(head.expert.state)
        row.response = row.acknowledgement()
        return row

    def _check_strategy(self, name: str, head: Head, source: LogRecord | SnapshotRow) -> Head:
        """Drop state written by another strategy, unless it holds buffered updates."""
        if isinstance(source, LogRecord):
            written: dict[str, Any] = source.header["strategy"]
        else:
            written = json.loads(source.strategy)
        wanted = describe(self._strategy)
        found = {key: written.get(key) for key in wanted}
        if found == wanted or head.state.empty:
            return head
        if head.state.update_ids:
            raise errors.StateDirError(
                f"expert {name} has {len(head.state.update_ids)} acknowledged update(s) "
                f"buffered by strategy {found}; restart with that strategy until the buffer "
                f"is applied (it is applied after --buffer-timeout), not with {wanted}"
            )
        logger.warning("expert %s: strategy changed from %s; its state starts anew", name, found)
        return Head(head.expert, StrategyState(), head.lsn)
