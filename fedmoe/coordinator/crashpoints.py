"""TEST-ONLY crash hooks: make the coordinator SIGKILL itself at a named point.

The durability tests set ``FEDMOE_TEST_CRASH_AT=<point>[:<n>]`` in a coordinator
process's environment to kill it (``kill -9`` semantics: no handler, no flush) the
``n``-th time (default: first) it reaches ``point``. Points: ``mid-append`` (half a
log record written), ``after-append`` (record fsynced, not yet in SQLite nor
acknowledged), ``mid-snapshot`` (snapshot files written, not yet current),
``mid-compaction`` (a log segment retired, older snapshot files not yet removed).
Unset (always, outside tests) every hook is an environment lookup that does nothing.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "FEDMOE_TEST_CRASH_AT"
POINTS = ("mid-append", "after-append", "mid-snapshot", "mid-compaction")

_counts: dict[str, int] = {}
_lock = threading.Lock()


def armed(point: str) -> bool:
    """Whether this is the visit of ``point`` the environment asks to crash at."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return False
    name, _, nth = wanted.partition(":")
    if name != point:
        return False
    with _lock:
        _counts[point] = _counts.get(point, 0) + 1
        return _counts[point] == int(nth or 1)


def die() -> None:
    """SIGKILL this process now (no cleanup runs, as with ``kill -9``)."""
    os.kill(os.getpid(), signal.SIGKILL)


def reached(point: str) -> None:
    """Die here if the environment asks for this visit of ``point``."""
    if armed(point):
        die()
