"""One way to open the coordinator's SQLite database, shared by every table's owner.

The ledger, the evaluation log and the forget book each keep their own connection to the
same file (a ``Database`` subclass: one connection, one lock, one way to read and to write
a transaction); all of them want the same settings: autocommit (explicit ``BEGIN IMMEDIATE``
transactions), write-ahead journaling, a full fsync per commit, and waiting for another
connection's write instead of failing at once.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

BUSY_TIMEOUT_MS = 10_000


def connect(path: Path, schema: str) -> sqlite3.Connection:
    """A connection to ``path`` (usable from any thread) with ``schema`` applied."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    db.executescript(schema)
    return db


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error.

    A ``logged`` transaction commits without its own fsync (synchronous=NORMAL): it
    records an update whose log record was fsynced already, and start-up restores any
    row a power cut took from SQLite out of that record. Everything else is FULL.
    """

    def __init__(self, db: sqlite3.Connection, *, logged: bool = False) -> None:
        self._db, self._logged = db, logged

    def __enter__(self) -> sqlite3.Connection:
        if self._logged:
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            if self._logged:
                self._db.execute("PRAGMA synchronous=FULL")


class Database:
    """One owner's connection to the database (``schema`` applied), used under its lock."""

    def __init__(self, path: Path, schema: str) -> None:
        self._lock = threading.Lock()
        self._db = connect(path, schema)

    def close(self) -> None:
        """Close this connection."""
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _transaction(self, *, logged: bool = False) -> Transaction:
        """A transaction on this connection; the caller holds ``self._lock``."""
        return Transaction(self._db, logged=logged)
