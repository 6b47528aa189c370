"""The SQLite update ledger and durable expert/gateway versions (WAL mode, synchronous=FULL).

Adapter tensors live in files (``fedmoe.coordinator.store``); this database is
the source of truth for which version of each file is current.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedmoe.coordinator.database import Database
from fedmoe.coordinator.ledger_rows import (
    AcceptedUpdate,
    Activity,
    SnapshotRow,
    StrategyRow,
    UpdateRecord,
)
from fedmoe.schemas import LedgerRow, UpdateAck, WorkerInfo

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experts (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL,
    accepted INTEGER NOT NULL DEFAULT 0, rejected INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS gateway (
    id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, built_from TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY, specialty TEXT NOT NULL, registered_at REAL NOT NULL,
    last_seen REAL NOT NULL, updates INTEGER NOT NULL DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0,
    last_train_loss REAL, last_staleness INTEGER);
CREATE TABLE IF NOT EXISTS updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, update_id TEXT NOT NULL, worker_id TEXT NOT NULL,
    expert TEXT NOT NULL, base_version INTEGER NOT NULL, staleness INTEGER NOT NULL,
    weight REAL NOT NULL, update_norm REAL NOT NULL, clipped INTEGER NOT NULL,
    train_loss REAL, num_tokens INTEGER NOT NULL, accepted INTEGER NOT NULL, reason TEXT,
    expert_version INTEGER, gateway_version INTEGER, response TEXT, created_at REAL NOT NULL,
    body_sha256 TEXT, body_blake3 TEXT);
CREATE TABLE IF NOT EXISTS strategy_state (
    expert TEXT PRIMARY KEY, seq INTEGER NOT NULL, strategy TEXT NOT NULL,
    buffer_fill INTEGER NOT NULL, steps INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    expert TEXT PRIMARY KEY, lsn INTEGER NOT NULL, version INTEGER NOT NULL,
    strategy TEXT NOT NULL, has_state INTEGER NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS updates_accepted_id ON updates(update_id) WHERE accepted = 1;
CREATE INDEX IF NOT EXISTS workers_last_seen ON workers(last_seen);
CREATE INDEX IF NOT EXISTS workers_joined ON workers(specialty, registered_at);
"""
# Columns added after the first release: ledgers written before them get them on open.
ADDED_COLUMNS = {
    "updates": {
        "body_sha256": "TEXT",  # rows written before body_blake3
        "body_blake3": "TEXT",
        "buffered": "INTEGER NOT NULL DEFAULT 0",
        "state_sha256": "TEXT",
        "verdict": "TEXT",  # robust aggregation: rejected / down-weighted (reason in reason)
        "dp_epsilon": "REAL",  # the sender's spent ε (example-level DP), as it reported
        "final": "INTEGER NOT NULL DEFAULT 0",  # the sender's last upload before it stopped
    },
    "workers": {"dp_epsilon": "REAL"},
}
WORKER_COLUMNS = (
    "specialty, registered_at, last_seen, updates, tokens, last_train_loss, last_staleness, "
    "dp_epsilon"
)


class Ledger(Database):
    """Thread-safe access to the coordinator's SQLite database."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        super().__init__(self.path, SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        for table, columns in ADDED_COLUMNS.items():
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def get_meta(self, key: str) -> str | None:
        """A value from the ``meta`` table, or None."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, values: dict[str, str]) -> None:
        """Insert or replace ``meta`` entries in one transaction."""
        with self._lock, self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    def snapshot_rows(self) -> dict[str, SnapshotRow]:
        """Each expert's newest durable snapshot."""
        rows = self._query("SELECT expert, lsn, version, strategy, has_state FROM snapshots")
        return {row[0]: SnapshotRow(row[0], row[1], row[2], row[3], bool(row[4])) for row in rows}

    def set_snapshot(self, row: SnapshotRow) -> None:
        """Make a snapshot current (fsynced: the log before it may then be retired)."""
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?)",
                (row.expert, row.lsn, row.version, row.strategy, int(row.has_state)),
            )

    def restore_logged(self, records: list[UpdateRecord], expert: str, version: int) -> int:
        """Insert the logged rows a crash kept out of SQLite, set the expert's version; how
        many rows were missing."""
        missing = 0
        with self._lock, self._transaction():
            for record in records:
                found = self._db.execute(
                    "SELECT 1 FROM updates WHERE update_id = ? AND accepted = 1",
                    (record.update_id,),
                ).fetchall()
                if not found:
                    self._insert_update(record)
                    self._touch_worker(record)
                    if not record.buffered:
                        self._db.execute(
                            "UPDATE experts SET accepted = accepted + 1 WHERE name = ?", (expert,)
                        )
                    missing += 1
            self._db.execute("UPDATE experts SET version = ? WHERE name = ?", (version, expert))
        return missing

    def expert_rows(self) -> dict[str, dict[str, int]]:
        """Each expert's version and accepted/rejected counts."""
        rows = self._query("SELECT name, version, accepted, rejected FROM experts")
        return {n: {"version": v, "accepted": a, "rejected": r} for n, v, a, r in rows}

    def add_expert(self, name: str) -> None:
        """Create an expert at version 0 (no-op if it exists)."""
        with self._lock, self._transaction():
            self._db.execute("INSERT OR IGNORE INTO experts (name, version) VALUES (?, 0)", (name,))

    def gateway_row(self) -> tuple[int, dict[str, Any]] | None:
        """The gateway's version and what it was built from, or None before the first build."""
        rows = self._query("SELECT version, built_from FROM gateway WHERE id = 1")
        return (rows[0][0], json.loads(rows[0][1])) if rows else None

    def set_gateway(self, version: int, built_from: dict[str, Any]) -> None:
        """Record a gateway rebuild that no update caused (start-up, new settings)."""
        with self._lock, self._transaction():
            self._write_gateway(version, built_from)

    def _write_gateway(self, version: int, built_from: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO gateway (id, version, built_from) VALUES (1, ?, ?)",
            (version, json.dumps(built_from, sort_keys=True)),
        )

    def accepted_update(self, update_id: str) -> AcceptedUpdate | None:
        """Who sent an accepted update id and the answer they got, for idempotent retries."""
        rows = self._query(
            "SELECT worker_id, expert, response, body_blake3, body_sha256 FROM updates "
            "WHERE update_id = ? AND accepted = 1",
            (update_id,),
        )
        if not rows:
            return None
        worker_id, expert, response, blake3, sha256 = rows[0]
        ack = UpdateAck.model_validate_json(response)
        return AcceptedUpdate(worker_id, expert, ack, blake3, sha256)

    def strategy_rows(self) -> dict[str, StrategyRow]:
        """Each expert's current strategy state row."""
        rows = self._query("SELECT expert, seq, strategy, buffer_fill, steps FROM strategy_state")
        return {row[0]: StrategyRow(*row) for row in rows}

    def recent_activity(
        self, expert: str, since: float, limit: int = 256, *, seen_from: int | None = None
    ) -> Activity:
        """The workers active on ``expert`` since ``since``, the known (> 0) token counts
        of their accepted updates and the version each one's newest update made, over at
        most the ``limit`` newest rows.

        Active: with an accepted update to the expert since then (an update that robust
        aggregation or the update screen rejected does not count) and not stopped (its
        newest one is not ``final``, or came after version ``seen_from``: an update made
        from that version shares the round of that last upload), or registered on it since
        then and yet to upload, so that the first round's uploads already know how many
        workers share the expert.
        """
        registered = self._query(
            "SELECT worker_id FROM workers "
            "WHERE specialty = ? AND registered_at >= ? AND updates = 0",
            (expert, since),
        )
        rows = self._query(
            "SELECT worker_id, num_tokens, final, expert_version FROM (SELECT worker_id, "
            "num_tokens, final, expert_version, created_at FROM updates WHERE expert = ? "
            "AND accepted = 1 "
            "AND verdict IS NOT 'rejected' ORDER BY seq DESC LIMIT ?) "
            "WHERE created_at >= ?",
            (expert, limit, since),
        )
        gone: dict[str, bool] = {}  # worker -> whether its newest update said goodbye
        newest: dict[str, int] = {}
        for worker, _, final, version in rows:
            seen = seen_from is None or (version is not None and version <= seen_from)
            gone.setdefault(worker, bool(final) and seen)
            newest.setdefault(worker, -1 if version is None else version)
        workers = {w for w, left in gone.items() if not left} | {w for (w,) in registered}
        tokens = [n for _, n, _, _ in rows if n > 0]
        return Activity(frozenset(workers), tuple(tokens), newest)

    def _write_strategy(self, row: StrategyRow | None) -> None:
        if row is not None:
            self._db.execute(
                "INSERT OR REPLACE INTO strategy_state VALUES (?, ?, ?, ?, ?)",
                (row.expert, row.seq, row.strategy, row.buffer_fill, row.steps),
            )

    def commit_buffered(self, record: UpdateRecord, strategy: StrategyRow | None = None) -> None:
        """Record an update held in a buffer and the buffer's new state file, atomically."""
        with self._lock, self._transaction(logged=True):
            self._insert_update(record)
            self._write_strategy(strategy)
            self._touch_worker(record)

    def commit_accepted(
        self,
        record: UpdateRecord,
        built_from: dict[str, Any],
        strategy: StrategyRow | None = None,
    ) -> None:
        """Record an accepted update, the expert's new version and the gateway's (and the
        strategy's new state file), atomically."""
        with self._lock, self._transaction(logged=True):
            self._insert_update(record)
            self._write_strategy(strategy)
            self._db.execute(
                "UPDATE experts SET version = ?, accepted = accepted + 1 WHERE name = ?",
                (record.expert_version, record.expert),
            )
            assert record.gateway_version is not None, "an accepted update has a gateway version"
            self._write_gateway(record.gateway_version, built_from)
            self._touch_worker(record)

    def commit_flush(
        self, expert: str, version: int, gateway_version: int, built_from: dict[str, Any]
    ) -> None:
        """Record a buffer applied by its timeout (no upload caused it): the expert's new
        version and the new gateway, atomically."""
        with self._lock, self._transaction(logged=True):
            self._db.execute("UPDATE experts SET version = ? WHERE name = ?", (version, expert))
            self._write_gateway(gateway_version, built_from)

    def commit_rejected(self, record: UpdateRecord) -> None:
        """Record an update refused by policy (staleness, norm)."""
        with self._lock, self._transaction():
            self._insert_update(record)
            self._db.execute(
                "UPDATE experts SET rejected = rejected + 1 WHERE name = ?", (record.expert,)
            )
            self._db.execute(
                "UPDATE workers SET last_seen = ?, last_staleness = ? WHERE worker_id = ?",
                (time.time(), record.staleness, record.worker_id),
            )

    def _insert_update(self, record: UpdateRecord) -> None:
        row = asdict(record)
        # in the response: the strategy_state row has the current fill, and the workers
        # active and the round's version are hints to the sender, not history
        for key in ("buffer_fill", "active_workers", "settle_version"):
            del row[key]
        row["response"] = record.response.model_dump_json() if record.response else None
        row["created_at"] = time.time()
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self._db.execute(f"INSERT INTO updates ({columns}) VALUES ({marks})", tuple(row.values()))

    def _touch_worker(self, record: UpdateRecord) -> None:
        self._db.execute(
            "UPDATE workers SET last_seen = ?, updates = updates + 1, tokens = tokens + ?, "
            "last_train_loss = ?, last_staleness = ?, dp_epsilon = COALESCE(?, dp_epsilon) "
            "WHERE worker_id = ?",
            (
                time.time(),
                record.num_tokens,
                record.train_loss,
                record.staleness,
                record.dp_epsilon,
                record.worker_id,
            ),
        )

    def record_verdicts(self, verdicts: tuple[tuple[str, str, str], ...]) -> None:
        """Note robust aggregation's verdicts on accepted (buffered) updates: the update's
        row gets ``verdict`` and ``reason`` (idempotent)."""
        if not verdicts:
            return
        with self._lock, self._transaction():
            self._db.executemany(
                "UPDATE updates SET verdict = ?, reason = ? WHERE update_id = ? AND accepted = 1",
                [(verdict, reason, update_id) for update_id, verdict, reason in verdicts],
            )

    def upsert_worker(self, worker_id: str, specialty: str) -> None:
        """Register (or re-register) a worker; its counters survive re-registration."""
        now = time.time()
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT INTO workers (worker_id, specialty, registered_at, last_seen) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(worker_id) DO UPDATE SET "
                "specialty = excluded.specialty, last_seen = excluded.last_seen",
                (worker_id, specialty, now, now),
            )

    def worker(self, worker_id: str) -> WorkerInfo | None:
        """One registered worker (a primary-key lookup), or None."""
        rows = self._query(
            f"SELECT {WORKER_COLUMNS} FROM workers WHERE worker_id = ?", (worker_id,)
        )
        return _worker_info(rows[0]) if rows else None

    def workers(self, *, offset: int = 0, limit: int = -1) -> dict[str, WorkerInfo]:
        """Registered workers with their counters, by worker id (a page of them)."""
        rows = self._query(
            f"SELECT worker_id, {WORKER_COLUMNS} FROM workers ORDER BY worker_id LIMIT ? OFFSET ?",
            (limit, offset),
        )
        return {row[0]: _worker_info(row[1:]) for row in rows}

    def worker_counts(self) -> dict[str, int]:
        """How many workers each expert has."""
        rows = self._query("SELECT specialty, COUNT(*) FROM workers GROUP BY specialty")
        return dict(rows)

    def forget_workers(self, seen_before: float) -> int:
        """Remove the workers not seen since ``seen_before``; how many were removed."""
        with self._lock, self._transaction():
            cursor = self._db.execute("DELETE FROM workers WHERE last_seen < ?", (seen_before,))
            return cursor.rowcount

    def updates(self, *, limit: int = 1000) -> list[LedgerRow]:
        """The most recent ledger rows, newest first."""
        with self._lock:
            cursor = self._db.execute("SELECT * FROM updates ORDER BY seq DESC LIMIT ?", (limit,))
            names = [c[0] for c in cursor.description]
            rows = cursor.fetchall()
        return [LedgerRow.model_validate(dict(zip(names, row))) for row in rows]


def _worker_info(row: tuple[Any, ...]) -> WorkerInfo:
    names = [name.strip() for name in WORKER_COLUMNS.split(",")]
    return WorkerInfo.model_validate(dict(zip(names, row)))
