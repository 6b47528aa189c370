"""The write-ahead log of deltas: one append-only log per expert, in segment files.

An accepted update is durable once its record (a JSON header with the ledger row and
what replay needs, then the upload's safetensors body exactly as received) is appended
to ``<state_dir>/wal/<expert>/<first lsn>.log`` and fsynced: one fsync per update.
Records carry a log sequence number (lsn), 1, 2, 3… per expert. A record is

    b"FMW1" | u32 header length | u64 body length | u32 crc32(header) | header | body

and the header holds the body's digest (``body_digest``), so a torn tail (a crash
mid-append) is told from a whole record and cut off at start-up.

A big body is *written ahead* (``ExpertLog.prewrite``): while the coordinator decodes and
applies the update, a helper thread writes the body where the record's body will lie,
after at least ``RESERVED`` bytes left for the prefix and the header (more, so that the
body starts at a multiple of ``ALIGN``), and flushes it to disk (``fdatasync``). Its
whole blocks go with direct I/O where the file system allows it, from the memory the
upload was received into: the page cache copy would cost a core about as much as the
update's own decode. ``append`` then writes the prefix and the header (JSON padded with
spaces to fill the reservation, which the crc covers) into that hole and fsyncs the file:
the record is the same format, and the fsync the acknowledgement waits for has only the
header left to write. Until then the tail is a hole (zeros: no magic) followed by the
body, which start-up cuts off as a torn tail like any other; an update refused meanwhile
truncates it away at once (``discard``). After a snapshot covers every record of a
segment, the segment is *retired*: moved to ``archive/`` (``delta_retention=keep``) or
deleted (``drop``), each by one rename or unlink, so a crash mid-compaction leaves every
segment either live or retired, never torn.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Generator, Iterator
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy

from fedmoe.coordinator import body_digest, crashpoints, errors

if TYPE_CHECKING:
    from fedmoe.adapters import Buffer

logger = logging.getLogger(__name__)

MAGIC = b"FMW1"
PREFIX = struct.Struct("<4sIQI")
MAX_HEADER = 1 << 20
SEGMENT = "{:012d}.log"
RESERVED = 4096  # bytes before a written-ahead body, at least: the prefix and the padded header
ALIGN = 4096  # a written-ahead body starts at a multiple of this in its segment (direct I/O)
PREWRITE_MIN = 16 * 1024  # smaller bodies are written with their header (no thread hop)


@dataclass(frozen=True)
class LogRecord:
    """One whole record: its header (``lsn``, ``kind``…), body and place in its segment."""

    header: dict[str, Any]
    body: bytes
    segment: str
    offset: int  # of the record's first byte

    @property
    def lsn(self) -> int:
        """The record's log sequence number."""
        return int(self.header["lsn"])


@dataclass(frozen=True)
class Appended:
    """Where a record went: enough to undo it or to read its body back."""

    segment: str
    offset: int
    body_offset: int
    body_len: int


@dataclass
class Prewritten:
    """A body being written ahead of its record (``ExpertLog.prewrite``)."""

    segment: str
    offset: int  # where the record will start; its body starts ``reserved`` bytes later
    reserved: int  # RESERVED and up to ALIGN − 1 more, so that the body starts aligned
    body_len: int
    lsn: int
    done: Future[None]
    created: bool  # the segment file is new: a discard removes it
    consumed: bool = field(default=False)  # appended, or discarded


def encode_prefix(header: dict[str, Any], body: Buffer, pad_to: int = 0) -> bytes:
    """The prefix and JSON header of a record whose body is ``body`` (the header padded with
    spaces so that both fill ``pad_to`` bytes, when it is given)."""
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * max(0, pad_to - PREFIX.size - len(raw))
    return PREFIX.pack(MAGIC, len(raw), len(body), zlib.crc32(raw)) + raw


def fsync_directory(path: Path) -> None:
    """Make a directory's entries (a new, renamed or removed file) durable."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


class ExpertLog:
    """The log of one expert: appends (under the expert's lock), replay, retirement."""

    def __init__(self, directory: Path, *, keep: bool) -> None:
        self.directory = Path(directory)
        self.archive = self.directory / "archive"
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        self._current: str | None = None  # the segment appends go to
        self._roll = False

    def segments(self) -> list[str]:
        """The live segment names, oldest first."""
        names = [p.name for p in self.directory.glob("*.log") if p.name[:-4].isdigit()]
        return sorted(names)

    def path_of(self, segment: str) -> Path:
        """Where a segment is now: live, else archived."""
        live = self.directory / segment
        return live if live.exists() else self.archive / segment

    def _segment_for(self, lsn: int) -> str:
        """The segment the record ``lsn`` goes to: a new one after ``roll()``."""
        if self._current is None or self._roll:
            self._current, self._roll = SEGMENT.format(lsn), False
        return self._current

    def prewrite(self, lsn: int, body: Buffer, pool: Executor) -> Prewritten:
        """Start writing ``body`` (on ``pool``) where the body of the next record, ``lsn``,
        will lie, and flushing it; ``append(..., prewritten=)`` or ``discard`` must follow,
        with no other append in between (the caller holds the expert's lock)."""
        segment = self._segment_for(lsn)
        path = self.directory / segment
        created = not path.exists()
        offset = 0 if created else path.stat().st_size
        reserved = RESERVED + (-(offset + RESERVED)) % ALIGN
        done = pool.submit(self._write_ahead, path, offset + reserved, body, created)
        return Prewritten(segment, offset, reserved, len(body), lsn, done, created)

    def _write_ahead(self, path: Path, position: int, body: Buffer, created: bool) -> None:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            view = memoryview(body)
            if crashpoints.armed("mid-append"):  # half of the body, no header: a torn tail
                os.pwrite(handle, view[: len(view) // 2], position)
                crashpoints.die()
            view, position = _write_direct(path, view, position)
            while view:  # pwrite may write less than asked
                written = os.pwrite(handle, view, position)
                view, position = view[written:], position + written
            os.fdatasync(handle)
        finally:
            os.close(handle)
        if created:
            fsync_directory(self.directory)

    def discard(self, prewritten: Prewritten) -> None:
        """Cut a written-ahead body off again (its update was refused: never acknowledged).
        No fsync: a crash before the next append's fsync leaves a torn tail at worst."""
        if prewritten.consumed:
            return
        prewritten.consumed = True
        wait([prewritten.done])  # done or failed: what it left is cut off below
        path = self.directory / prewritten.segment
        if prewritten.created:
            path.unlink(missing_ok=True)  # the log's files as they were
        elif path.exists():
            os.truncate(path, prewritten.offset)

    def _complete(
        self, header: dict[str, Any], body: Buffer, prewritten: Prewritten
    ) -> Appended | None:
        """Write the prefix and header in front of a written-ahead body and fsync; None when
        they do not fit the reservation (the body is cut off: write the record the usual way)."""
        assert not prewritten.consumed and int(header["lsn"]) == prewritten.lsn
        assert len(body) == prewritten.body_len
        prewritten.done.result()  # the write's error, if any (the caller discards)
        prefix = encode_prefix(header, body, pad_to=prewritten.reserved)
        if len(prefix) > prewritten.reserved:
            self.discard(prewritten)
            return None
        prewritten.consumed = True
        handle = os.open(self.directory / prewritten.segment, os.O_WRONLY)
        try:
            os.pwrite(handle, prefix, prewritten.offset)
            os.fsync(handle)
        finally:
            os.close(handle)
        offset = prewritten.offset
        return Appended(prewritten.segment, offset, offset + prewritten.reserved, len(body))

    def append(
        self, header: dict[str, Any], body: Buffer, prewritten: Prewritten | None = None
    ) -> Appended:
        """Append one record and fsync it; a new segment starts after ``roll()``. With
        ``prewritten`` (of this ``body``) only the prefix and header are left to write."""
        if prewritten is not None:
            appended = self._complete(header, body, prewritten)
            if appended is not None:
                return appended
        path = self.directory / self._segment_for(int(header["lsn"]))
        created = not path.exists()
        prefix = encode_prefix(header, body)
        with open(path, "ab") as handle:
            offset = handle.tell()
            handle.write(prefix)
            if crashpoints.armed("mid-append"):
                handle.write(body[: len(body) // 2])
                handle.flush()
                crashpoints.die()
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            fsync_directory(self.directory)
        return Appended(path.name, offset, offset + len(prefix), len(body))

    def undo(self, appended: Appended) -> None:
        """Cut the log back to before ``appended`` (its commit failed: never acknowledged)."""
        path = self.directory / appended.segment
        with open(path, "r+b") as handle:
            handle.truncate(appended.offset)
            os.fsync(handle.fileno())

    def roll(self) -> None:
        """The next append starts a new segment (so that a snapshot can retire this one)."""
        self._roll = True

    def read_body(self, segment: str, offset: int, length: int) -> bytes:
        """The body of a record, from its segment (live or archived)."""
        with open(self.path_of(segment), "rb") as handle:
            handle.seek(offset)
            body = handle.read(length)
        if len(body) != length:
            raise OSError(f"log segment {segment} is shorter than its index says")
        return body

    def records(self, *, repair: bool = True) -> Iterator[LogRecord]:
        """Every whole live record in order; a torn tail of the last segment is cut off
        (``repair``) — a bad record anywhere else is a damaged state dir."""
        segments = self.segments()
        for index, segment in enumerate(segments):
            end = yield from _read_segment(self.directory / segment, segment)
            size = (self.directory / segment).stat().st_size
            if end == size:
                continue
            if index != len(segments) - 1:
                raise errors.StateDirError(
                    f"log segment {self.directory / segment} is damaged at byte {end} and is "
                    "not the last one; restore the state dir from a backup"
                )
            if repair:
                logger.warning("cutting a torn record (crash mid-append) off %s", segment)
                with open(self.directory / segment, "r+b") as handle:
                    handle.truncate(end)
                    os.fsync(handle.fileno())
        self._current = segments[-1] if segments else None

    def retire(self, upto_lsn: int) -> int:
        """Retire every segment that starts at or before ``upto_lsn``; how many.

        Only after ``roll()`` was called when the snapshot at ``upto_lsn`` was taken: then
        every record after it went to a later segment.
        """
        retired = [name for name in self.segments() if int(name[:-4]) <= upto_lsn]
        for index, segment in enumerate(retired):
            self._retire_one(segment)
            if index == 0:
                crashpoints.reached("mid-compaction")
        return len(retired)

    def _retire_one(self, segment: str) -> None:
        source = self.directory / segment
        if self.keep:
            self.archive.mkdir(exist_ok=True)
            os.replace(source, self.archive / segment)
            fsync_directory(self.archive)
        else:
            source.unlink()
        fsync_directory(self.directory)
        if segment == self._current:
            self._current = None

    def all_records(self) -> Iterator[LogRecord]:
        """Archived then live records, in lsn order (read only; nothing is repaired)."""
        archived = self.archive.glob("*.log") if self.archive.exists() else []
        for segment in sorted(path.name for path in archived):
            yield from _read_segment(self.archive / segment, segment)
        yield from self.records(repair=False)


def _write_direct(path: Path, view: memoryview, position: int) -> tuple[memoryview, int]:
    """Write the whole ALIGN-sized blocks at the start of ``view`` to ``position`` with
    direct I/O (the device reads them from this memory: no copy into the page cache, which
    costs a core about a millisecond per MB beside the update path's own work); what is
    left to write, and where. Nothing is written where direct I/O does not apply: an
    unaligned position, memory or size, or a file system without it."""
    size = len(view) - len(view) % ALIGN
    direct = getattr(os, "O_DIRECT", 0)
    if not direct or size == 0 or position % ALIGN or _address(view) % ALIGN:
        return view, position
    try:
        handle = os.open(path, os.O_WRONLY | direct)
    except OSError:
        return view, position
    try:
        done = 0
        while done < size:
            done += os.pwrite(handle, view[done:size], position + done)
    except OSError:  # e.g. EINVAL: this file system's rules; the buffered write redoes it
        return view, position
    finally:
        os.close(handle)
    return view[size:], position + size


def _address(view: memoryview) -> int:
    """Where ``view``'s first byte lies in memory."""
    return int(numpy.frombuffer(view, dtype=numpy.uint8).ctypes.data) if len(view) else 0


def _read_record(handle: BinaryIO, segment: str) -> LogRecord | None:
    offset = handle.tell()
    prefix = handle.read(PREFIX.size)
    if len(prefix) < PREFIX.size:
        return None
    magic, header_len, body_len, crc = PREFIX.unpack(prefix)
    if magic != MAGIC or header_len > MAX_HEADER:
        return None
    raw = handle.read(header_len)
    if len(raw) < header_len or zlib.crc32(raw) != crc:
        return None
    header = json.loads(raw)
    body = handle.read(body_len)
    if len(body) < body_len:
        return None
    if not body_digest.matches(header, body):
        return None
    return LogRecord(header, body, segment, offset)


def _read_segment(path: Path, segment: str) -> Generator[LogRecord, None, int]:
    """Yield the whole records of a segment; return the offset where they end."""
    with open(path, "rb") as handle:
        end = 0
        while (record := _read_record(handle, segment)) is not None:
            end = handle.tell()
            yield record
        return end


def segment_records(path: Path) -> tuple[list[LogRecord], bool]:
    """Every whole record of one segment file, and whether they fill it (read only)."""
    records: list[LogRecord] = []
    reader = _read_segment(path, path.name)
    while True:
        try:
            records.append(next(reader))
        except StopIteration as stop:
            return records, stop.value == path.stat().st_size
