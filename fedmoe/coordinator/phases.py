"""Where an update's time goes: wall-clock phase marks, logged at DEBUG.

``begin()`` starts the marks of the update the calling thread handles, ``mark(name)``
closes the phase that ran since the previous mark, and ``end(what)`` logs them all in one
line (``fedmoe.coordinator.phases``: ``update u1: check 0.4 ms, lock 0.0 ms, ...``). With
that logger above DEBUG (always, unless someone asks) each call is one level check.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger(__name__)
_local = threading.local()


def begin() -> None:
    """Start timing the phases of what this thread does next (only when DEBUG is on)."""
    _local.marks = [("", time.perf_counter())] if logger.isEnabledFor(logging.DEBUG) else None


def mark(phase: str) -> None:
    """The phase ``phase`` ended now (a no-op unless ``begin`` started a timing)."""
    marks: list[tuple[str, float]] | None = getattr(_local, "marks", None)
    if marks is not None:
        marks.append((phase, time.perf_counter()))


def end(what: str) -> None:
    """Log the phases since ``begin`` as one DEBUG line, and stop timing."""
    marks: list[tuple[str, float]] | None = getattr(_local, "marks", None)
    _local.marks = None
    if not marks or len(marks) < 2:
        return
    parts = [f"{name} {1e3 * (t - marks[i][1]):.1f} ms" for i, (name, t) in enumerate(marks[1:])]
    total = 1e3 * (marks[-1][1] - marks[0][1])
    logger.debug("%s: %s; total %.1f ms", what, ", ".join(parts), total)
