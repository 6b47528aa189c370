"""Purging a forgotten worker's raw deltas from the archived write-ahead log.

After ``fedmoe forget`` has rebuilt an expert and a snapshot has retired the log it
covers, the archived segments (``wal/<expert>/archive``, ``delta_retention=keep``) still
hold the removed worker's uploads as received. Nothing needs them any more: recovery
starts from a snapshot, and a later rebuild skips every forgotten worker's records
without reading their bodies. Each archived segment holding such a body is rewritten
without it: the record stays (its header, the ledger row: ids, norm, loss, token count,
the body's digest, marked ``purged``) with an empty body, so the lsn sequence is whole.
The bodies of earlier ``forget`` records (full expert states that included the worker)
go too. A segment is rewritten to a temp file, fsynced and renamed over the old one: a
crash leaves it either whole or purged, and purging again is a no-op.

Not purged: the live segments (the snapshot after a rebuild retires every segment with
the worker's records; one that a failed snapshot left live is purged when the pending
rebuild is settled at the next start-up), and other workers' deltas.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from pathlib import Path

from fedmoe.coordinator import body_digest
from fedmoe.coordinator.wal import (
    ExpertLog,
    LogRecord,
    encode_prefix,
    fsync_directory,
    segment_records,
)

logger = logging.getLogger(__name__)

EMPTY_DIGEST = body_digest.body_digest(b"")


def purgeable(record: LogRecord, forgotten: Collection[str], before_lsn: int) -> bool:
    """Whether ``record``'s body should go: an upload of a forgotten worker, or an earlier
    rebuild's expert state (``before_lsn``: the newest rebuild's record)."""
    header = record.header
    if header.get("purged") or not record.body:
        return False
    if header["kind"] == "update":
        return str(header["ledger"]["worker_id"]) in forgotten
    return header["kind"] == "forget" and record.lsn < before_lsn


def purge_archive(log: ExpertLog, forgotten: Collection[str], before_lsn: int) -> int:
    """Rewrite the archived segments of ``log`` without the purgeable bodies; how many
    bodies were removed."""
    if not log.archive.exists():
        return 0
    removed = 0
    for path in sorted(log.archive.glob("*.log")):
        removed += _purge_segment(path, forgotten, before_lsn)
    if removed:
        logger.info("purged %d archived record body(ies) of %s", removed, log.directory.name)
    return removed


def _purge_segment(path: Path, forgotten: Collection[str], before_lsn: int) -> int:
    records, whole = segment_records(path)
    if not whole:  # never rewrite what cannot be read back in full
        logger.warning("archived segment %s is damaged: not purged", path)
        return 0
    if not any(purgeable(r, forgotten, before_lsn) for r in records):
        return 0
    temp = path.with_name(f".{path.name}.purge.tmp")
    removed = 0
    with open(temp, "wb") as handle:
        for record in records:
            header, body = record.header, record.body
            if purgeable(record, forgotten, before_lsn):
                kept = {k: v for k, v in header.items() if k != body_digest.LEGACY_KEY}
                header = kept | {"purged": True, body_digest.KEY: EMPTY_DIGEST}
                body, removed = b"", removed + 1
            handle.write(encode_prefix(header, body) + body)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_directory(path.parent)
    return removed
