"""One way to open the coordinator's SQLite database, shared by every table's owner.

The ledger, the evaluation log and the forget book each keep their own connection to the
same file; all of them want the same settings: autocommit (explicit ``BEGIN IMMEDIATE``
transactions), write-ahead journaling, a full fsync per commit, and waiting for another
connection's write instead of failing at once.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

BUSY_TIMEOUT_MS = 10_000


def connect(path: Path, schema: str) -> sqlite3.Connection:
    """A connection to ``path`` (usable from any thread) with ``schema`` applied."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    db.executescript(schema)
    return db
