"""Receiving an upload into one buffer, and decoding it on two threads once it is in
(issue 13: acknowledgement latency).

``UploadBuffer`` is fed the body's chunks in order into one buffer of the announced size.
Once the safetensors header is in, it is checked against the schema
(``adapters.check_layout``). After the last byte, ``finish()`` converts every tensor to
float32 with its float64 norm exactly as ``adapters.decode_with_norm`` converts it
(``tensor_with_norm``, combined in the same data order by ``combined_norm``), in batches
shared by two threads: a helper takes them from the oldest, a second thread from the
newest. The update path asks for the result only once it has started writing the body to
its log, so the conversion runs beside that write and its ``fdatasync``. (Converting each
tensor while the bytes still arrived was measured slower: on loopback the sender, the event
loop and the body's hash already keep two cores busy, and on a slow link the log's flush hides
the conversion just as well.) The buffer itself is the body the update path and the log
use (``body()``: a read-only view, not a copy). ``finish()`` gives what
``decode_with_norm`` gives for the same bytes, or None when it cannot vouch for them
(non-finite values): the update path then decodes the body itself, and refuses it with
the same message as ever.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from fedmoe.adapters import (
    MAX_HEADER_BYTES,
    AdapterSchema,
    AdapterValidationError,
    check_layout,
    combined_norm,
    tensor_with_norm,
)
from fedmoe.aggregate import AdapterState

BATCH = 1 << 20  # bytes of tensor data converted as one task
# Two threads convert a body's batches, from either end (``finish``).
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmoe-upload-decode")
_TAIL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmoe-upload-decode-tail")

Converted = list[tuple[str, torch.Tensor, torch.Tensor]]
Decoded = tuple[AdapterState, float]


def receive_buffer(size: int) -> mmap.mmap:
    """``size`` bytes of private anonymous memory, advised into transparent huge pages.

    Private, not ``mmap``'s default shared mapping (shared anonymous memory is shmem, whose
    page faults cost more), and in 2 MiB pages where the kernel allows: a 17.6 MB body
    then takes 9 page faults instead of about 4,300, which cost the event loop receiving
    it about as much as copying the bytes in.
    """
    buffer = mmap.mmap(-1, max(1, size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
    if advice is not None:
        with contextlib.suppress(OSError):  # no THP in this kernel: 4 KiB pages as ever
            buffer.madvise(advice)
    return buffer


class ReceivePool:
    """Receive buffers kept for the next upload of the same size.

    Fresh anonymous memory costs a page fault per page on first touch, and on a virtual
    machine that hands freed memory back to its host those faults took 20-60 ms of the
    event loop per 17.6 MB body here (against about 4 ms to copy the bytes into memory
    touched before). A kept buffer is handed out again only once nothing else refers to
    it: no body view, tensor or decode still holds it (CPython's reference count), so a
    reuse never changes bytes that anyone can still read.
    """

    def __init__(self, *, keep: int = 4) -> None:
        self.keep = keep  # buffers kept, idle or in use
        self._lock = threading.Lock()
        # what ``_refcounts`` reads for a buffer nobody else holds (the interpreter's own
        # references while it looks), read once the same way on a probe buffer
        self._buffers = [receive_buffer(1)]
        self._alone = self._refcounts()[0][1]
        self._buffers = []

    def take(self, size: int) -> mmap.mmap:
        """An idle kept buffer of exactly ``size`` bytes, or a new one (kept if there is room
        or an idle one to drop)."""
        size = max(1, size)
        with self._lock:
            idle = [buffer for buffer, count in self._refcounts() if count <= self._alone]
            for buffer in idle:
                if len(buffer) == size:
                    return buffer
            buffer = receive_buffer(size)
            if len(self._buffers) >= self.keep and idle:
                self._buffers.remove(idle[0])  # the oldest idle one, freed
            if len(self._buffers) < self.keep:
                self._buffers.append(buffer)
            return buffer

    def _refcounts(self) -> list[tuple[mmap.mmap, int]]:
        return [(buffer, sys.getrefcount(buffer)) for buffer in self._buffers]


RECEIVE_BUFFERS = ReceivePool()


class UploadBuffer:
    """A body of ``size`` bytes, received chunk by chunk, decoded once it is all in."""

    def __init__(self, schema: AdapterSchema, size: int) -> None:
        self.schema, self.size = schema, size
        # anonymous memory: pages are taken as bytes arrive, not when a size is announced
        self.buffer = RECEIVE_BUFFERS.take(size)
        self._view = memoryview(self.buffer)
        self.received = 0
        self._layout: tuple[dict[str, Any], int, list[str]] | None = None
        self._failed = False  # not a body this can vouch for: the update path decodes it
        self._batches: list[tuple[list[str], Future[Converted]]] = []

    def feed(self, chunk: bytes) -> None:
        """Copy the next chunk in (and check the header once it is all in)."""
        end = self.received + len(chunk)
        if end > self.size:
            raise ValueError(f"the body is longer than its announced {self.size} bytes")
        self._view[self.received : end] = chunk
        self.received = end
        if self._layout is None and not self._failed:
            self._layout = self._read_layout()

    def _read_layout(self) -> tuple[dict[str, Any], int, list[str]] | None:
        """The checked header once it is all in (None before, and for a bad one)."""
        if self.received < 8:
            return None
        (header_len,) = struct.unpack("<Q", self.buffer[:8])
        if header_len > MAX_HEADER_BYTES:
            self._failed = True
            return None
        if self.received < 8 + header_len:
            return None
        try:
            return check_layout(bytes(self.buffer[: 8 + header_len]), self.schema, self.size)
        except AdapterValidationError:
            self._failed = True
            return None

    def _split(self) -> list[list[str]]:
        """The tensor names in data order, cut into batches of about ``BATCH`` bytes."""
        assert self._layout is not None
        header, _, keys = self._layout
        batches: list[list[str]] = [[]]
        size = 0
        for key in keys:
            if size >= BATCH:
                batches.append([])
                size = 0
            begin, stop = header[key]["data_offsets"]
            batches[-1].append(key)
            size += stop - begin
        return [batch for batch in batches if batch]

    def _convert(self, keys: list[str]) -> Converted:
        assert self._layout is not None
        header, start, _ = self._layout
        return [(key, *tensor_with_norm(self.buffer, start, header[key])) for key in keys]

    @property
    def vouches_for_layout(self) -> bool:
        """Whether the whole body is in and its header passed ``check_layout``."""
        return not self._failed and self._layout is not None and self.received == self.size

    def body(self) -> memoryview:
        """The received bytes, read only, where they were received (no copy: the view keeps
        the buffer alive as long as anyone holds it, e.g. the log writing it)."""
        return self._view[: self.received].toreadonly()

    def finish(self) -> Future[Decoded | None]:
        """The decoded tensors and norm of the whole body (None: decode it again): the
        helper converts the batches from the oldest, a second thread those it has not
        started from the newest (the same conversion either way)."""
        if not self.vouches_for_layout:
            done: Future[Decoded | None] = Future()
            done.set_result(None)
            return done
        self._batches = [(batch, _POOL.submit(self._convert, batch)) for batch in self._split()]
        return _TAIL.submit(self._gather, list(self._batches))

    def _gather(self, batches: list[tuple[list[str], Future[Converted]]]) -> Decoded | None:
        stolen: dict[int, Converted] = {}
        try:
            for index in reversed(range(len(batches))):
                keys, pending = batches[index]
                if pending.cancel():  # not started: the helper will skip it
                    stolen[index] = self._convert(keys)
            converted = [
                item
                for index, (_, pending) in enumerate(batches)
                for item in (stolen[index] if index in stolen else pending.result())
            ]
        except Exception:  # the update path's own decode says what is wrong
            return None
        state = {key: tensor for key, tensor, _ in converted}
        try:
            return state, combined_norm(state, [norm for _, _, norm in converted])
        except AdapterValidationError:
            return None  # non-finite: the update path's own decode names the tensor
