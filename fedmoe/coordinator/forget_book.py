"""The durable record of removed workers, beside the update ledger (``fedmoe forget``).

Two tables of the coordinator's SQLite database (its own connection, WAL,
``synchronous=FULL``): ``forgotten_workers``, the revoked worker ids (their tokens and
registrations are refused for good), and ``forgets``, one row per expert rebuilt
without a worker, written *pending* before the rebuild's log record is appended and
marked done after. At start-up a pending row whose log record survived a crash is
marked done, one whose record did not is dropped (the worker stays revoked; running
``fedmoe forget`` again rebuilds the expert).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedmoe.coordinator.database import Database
from fedmoe.schemas import ForgetRow

SCHEMA = """
CREATE TABLE IF NOT EXISTS forgotten_workers (
    worker_id TEXT PRIMARY KEY, forgotten_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS forgets (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, worker_id TEXT NOT NULL, expert TEXT NOT NULL,
    old_version INTEGER NOT NULL, new_version INTEGER NOT NULL, lsn INTEGER NOT NULL,
    updates_removed INTEGER NOT NULL, update_ids TEXT NOT NULL, done INTEGER NOT NULL,
    created_at REAL NOT NULL);
"""
COLUMNS = (
    "seq, worker_id, expert, old_version, new_version, lsn, updates_removed, update_ids, created_at"
)


class ForgetBook(Database):
    """Revoked worker ids and the rebuilds done without them."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> int:
        """Run ``statements`` in one transaction; the last one's ``lastrowid``."""
        last = 0
        with self._lock, self._transaction() as db:
            for sql, args in statements:
                last = db.execute(sql, args).lastrowid or 0
        return last

    def revoked(self) -> set[str]:
        """Every revoked worker id."""
        return {row[0] for row in self._query("SELECT worker_id FROM forgotten_workers")}

    def revoke(self, worker_id: str) -> None:
        """Revoke ``worker_id`` and delete its registration, in one transaction."""
        self._write(
            [
                (
                    "INSERT OR IGNORE INTO forgotten_workers VALUES (?, ?)",
                    (worker_id, time.time()),
                ),
                ("DELETE FROM workers WHERE worker_id = ?", (worker_id,)),
            ]
        )

    def known(self, worker_id: str) -> bool:
        """Whether ``worker_id`` is registered, ever sent an update or was revoked."""
        rows = self._query(
            "SELECT EXISTS (SELECT 1 FROM workers WHERE worker_id = ?) "
            "OR EXISTS (SELECT 1 FROM updates WHERE worker_id = ?) "
            "OR EXISTS (SELECT 1 FROM forgotten_workers WHERE worker_id = ?)",
            (worker_id, worker_id, worker_id),
        )
        return bool(rows[0][0])

    def contributed(self, worker_id: str) -> list[str]:
        """The experts that acknowledged updates of ``worker_id`` (the update ledger)."""
        rows = self._query(
            "SELECT DISTINCT expert FROM updates WHERE worker_id = ? AND accepted = 1",
            (worker_id,),
        )
        return [row[0] for row in rows]

    def rebuilt(self, worker_id: str) -> set[str]:
        """The experts already rebuilt without ``worker_id``."""
        rows = self._query(
            "SELECT expert FROM forgets WHERE worker_id = ? AND done = 1", (worker_id,)
        )
        return {row[0] for row in rows}

    def begin(self, row: ForgetRow) -> int:
        """Write a pending rebuild row (before its log record); its ``seq``."""
        values = (
            row.worker_id,
            row.expert,
            row.old_version,
            row.new_version,
            row.lsn,
            row.updates_removed,
            json.dumps(row.update_ids),
            row.created_at,
        )
        sql = (
            "INSERT INTO forgets (worker_id, expert, old_version, new_version, lsn, "
            "updates_removed, update_ids, done, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)"
        )
        return self._write([(sql, values)])

    def finish(self, seq: int) -> None:
        """The rebuild's log record is durable: the row counts."""
        self._write([("UPDATE forgets SET done = 1 WHERE seq = ?", (seq,))])

    def discard(self, seq: int) -> None:
        """The rebuild never reached the log: forget the row."""
        self._write([("DELETE FROM forgets WHERE seq = ? AND done = 0", (seq,))])

    def pending(self) -> list[tuple[int, str, int]]:
        """(seq, expert, lsn) of every rebuild a crash left pending."""
        rows = self._query("SELECT seq, expert, lsn FROM forgets WHERE done = 0 ORDER BY seq")
        return [(int(seq), str(expert), int(lsn)) for seq, expert, lsn in rows]

    def rows(self, limit: int = 100) -> list[ForgetRow]:
        """The newest done rebuilds, newest first."""
        rows = self._query(
            f"SELECT {COLUMNS} FROM forgets WHERE done = 1 ORDER BY seq DESC LIMIT ?", (limit,)
        )
        names = [name.strip() for name in COLUMNS.split(",")]
        found = []
        for row in rows:
            values = dict(zip(names, row))
            values["update_ids"] = json.loads(values["update_ids"])
            found.append(ForgetRow.model_validate(values))
        return found
