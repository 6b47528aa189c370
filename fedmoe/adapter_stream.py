"""Decoding an upload tensor by tensor while it arrives (issue 13: acknowledgement latency).

``StreamingDecode`` is fed the body's chunks in order into one buffer of the announced
size. Once the safetensors header is in, it is checked against the schema
(``adapters.check_layout``); from then on every tensor whose bytes have all arrived is
converted to float32 with its float64 norm on a helper thread, exactly as
``adapters.decode_with_norm`` converts it (``tensor_with_norm``, combined in the same data
order by ``combined_norm``). On a busy machine (the sender, the event loop and the
sha256 share the cores) the helper falls behind while the body arrives; after the last
byte the batches it has not started are converted by a second thread, newest first, while
it goes on from the oldest. The buffer itself is the body the update path and the log
use (``body()``: a read-only view, not a copy). ``finish()`` gives
what ``decode_with_norm`` gives for the same bytes, or None when it cannot vouch for them
(a bad header, non-finite values): the update path then decodes the body itself, and
refuses it with the same message as ever.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
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

BATCH = 1 << 20  # bytes of tensor data handed to the helper thread at a time
# One thread: it converts while the event loop receives; more would only contend with it.
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmoe-stream-decode")
# After the last byte the event loop and the sender are idle: the batches the helper has
# not started yet are shared with a second thread (``finish``).
_TAIL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmoe-stream-decode-tail")

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


class StreamingDecode:
    """A body of ``size`` bytes, received chunk by chunk, decoded as it comes."""

    def __init__(self, schema: AdapterSchema, size: int) -> None:
        self.schema, self.size = schema, size
        # anonymous memory: pages are taken as bytes arrive, not when a size is announced
        self.buffer = receive_buffer(size)
        self._view = memoryview(self.buffer)
        self.received = 0
        self._layout: tuple[dict[str, Any], int, list[str]] | None = None
        self._failed = False  # not a body this can vouch for: the update path decodes it
        self._next = 0  # the first tensor (in data order) not yet handed to the thread
        self._batches: list[tuple[list[str], Future[Converted]]] = []

    def feed(self, chunk: bytes) -> None:
        """Copy the next chunk in; hand the tensors it completes to the helper thread."""
        end = self.received + len(chunk)
        if end > self.size:
            raise ValueError(f"the body is longer than its announced {self.size} bytes")
        self._view[self.received : end] = chunk
        self.received = end
        if self._failed:
            return
        if self._layout is None:
            self._layout = self._read_layout()
        if self._layout is not None:
            self._hand_over(final=False)

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

    def _hand_over(self, *, final: bool) -> None:
        """Submit the received tensors not yet submitted, once they make a batch."""
        assert self._layout is not None
        header, start, keys = self._layout
        ready, size = self._next, 0
        while ready < len(keys):
            begin, stop = header[keys[ready]]["data_offsets"]
            if start + stop > self.received:
                break
            ready, size = ready + 1, size + stop - begin
        if ready > self._next and (final or size >= BATCH):
            batch = keys[self._next : ready]
            self._batches.append((batch, _POOL.submit(self._convert, batch)))
            self._next = ready

    def _convert(self, keys: list[str]) -> Converted:
        assert self._layout is not None
        header, start, _ = self._layout
        return [(key, *tensor_with_norm(self.buffer, start, header[key])) for key in keys]

    def body(self) -> memoryview:
        """The received bytes, read only, where they were received (no copy: the view keeps
        the buffer alive as long as anyone holds it, e.g. the log writing it)."""
        return self._view[: self.received].toreadonly()

    def finish(self) -> Future[Decoded | None]:
        """The decoded tensors and norm of the whole body (None: decode it again), on a
        second thread that converts the batches the helper has not started, newest first,
        while the helper goes on from the oldest (the same conversion either way)."""
        if self._failed or self._layout is None or self.received != self.size:
            done: Future[Decoded | None] = Future()
            done.set_result(None)
            return done
        self._hand_over(final=True)
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
