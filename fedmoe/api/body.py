"""Reading an upload's body: hashing it while it arrives, decoding it once it is in.

The update path needs the body's digest (``fedmoe.coordinator.body_digest``: kept with the
update id in the ledger and the log record, so that a retry with other bytes is refused).
Hashed after the last byte it would add a full pass over the body to every
acknowledgement; here it is fed to a worker thread in batches while the event loop goes on
receiving (BLAKE3 releases the GIL on large inputs), so it is mostly done when the body
is. ``read_upload`` also receives a body that announces its length into one buffer and
starts decoding its tensors once it is in (``fedmoe.adapter_stream``). Neither is awaited
here: the update path gets both as futures and asks for them only when it needs them, so
that its log write (the fsync the acknowledgement waits for) starts while their last
batches are still being worked on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import HTTPException, Request

from fedmoe.adapter_stream import Decoded, UploadBuffer
from fedmoe.adapters import AdapterSchema, Buffer
from fedmoe.api.guard import CLOSE
from fedmoe.coordinator import phases
from fedmoe.coordinator.body_digest import new_hasher

BATCH = 1 << 20  # bytes handed to the hashing thread at a time
_HASHERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fedmoe-body-digest")


class StreamingDigest:
    """The body's digest fed chunk by chunk from the event loop, computed on a worker
    thread, in order."""

    def __init__(self) -> None:
        self._hasher = new_hasher()
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._lock = threading.Lock()  # one drain at a time: chunks hashed in arrival order
        self._threaded = False

    def feed(self, chunk: bytes) -> None:
        """Queue ``chunk``; every ``BATCH`` bytes the hashing thread takes what is queued."""
        self._queue.append(chunk)
        self._queued += len(chunk)
        if self._queued >= BATCH:
            self._queued, self._threaded = 0, True
            _HASHERS.submit(self._drain)

    def _drain(self) -> None:
        with self._lock:
            while self._queue:
                self._hasher.update(self._queue.popleft())

    def _hexdigest(self) -> str:
        self._drain()
        return self._hasher.hexdigest()

    def finish(self) -> Future[str]:
        """The digest of everything fed, finished on the hashing thread from now on (so the
        caller can go on meanwhile)."""
        if not self._threaded:  # a small body: hashed here, no thread hop
            done: Future[str] = Future()
            done.set_result(self._hexdigest())
            return done
        return _HASHERS.submit(self._hexdigest)


async def read_body(request: Request, limit: int) -> tuple[bytes, Future[str]]:
    """The body and its hex digest (being finished); 413 as soon as it is known to
    exceed ``limit``."""
    chunks, size, hasher = [], 0, StreamingDigest()
    started = time.perf_counter()
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, detail=f"body exceeds the {limit}-byte limit", headers=CLOSE)
        chunks.append(chunk)
        hasher.feed(chunk)
    received = time.perf_counter()
    digest = hasher.finish()  # the hash's tail on its thread while the body is joined here
    body = b"".join(chunks)
    _log_receipt(size, started, received, "received", "joined")
    return body, digest


@dataclass(frozen=True)
class Upload:
    """An upload's body as received, its digest and its decoded tensors (both possibly
    still being finished on their threads)."""

    body: Buffer  # bytes, or a read-only view of the buffer the body was decoded in
    hashing: Future[str]
    # as adapters.decode_with_norm gives them, or None when the decoder could not vouch for
    # the values; ``decoding`` is None when it could not vouch for the layout either
    decoding: Future[Decoded | None] | None


async def read_upload(request: Request, limit: int, schema: AdapterSchema) -> Upload:
    """``read_body``, and the tensors' decode started (when the length is known).

    Returns once the last byte is in. 413 at once when the announced length exceeds ``limit``.
    """
    length = _content_length(request)
    if length is None:  # chunked: no buffer to decode into
        body, digest = await read_body(request, limit)
        return Upload(body, digest, None)
    if length > limit:
        raise HTTPException(413, detail=f"body exceeds the {limit}-byte limit", headers=CLOSE)
    decoder, hasher = UploadBuffer(schema, length), StreamingDigest()
    started = time.perf_counter()
    async for chunk in request.stream():
        if decoder.received + len(chunk) > length:  # the HTTP parser does not allow it
            raise HTTPException(400, detail="the body is longer than its Content-Length")
        decoder.feed(chunk)
        hasher.feed(chunk)
    received = time.perf_counter()
    decoding = decoder.finish() if decoder.vouches_for_layout else None
    upload = Upload(decoder.body(), hasher.finish(), decoding)
    _log_receipt(length, started, received, "received", "handed over")
    return upload


def _log_receipt(size: int, started: float, received: float, during: str, after: str) -> None:
    """The body's part of an update's phase timings (``fedmoe.coordinator.phases``)."""
    if phases.logger.isEnabledFor(logging.DEBUG):
        phases.logger.debug(
            "body of %d bytes: %s in %.1f ms, %s %.1f ms later",
            size,
            during,
            1e3 * (received - started),
            after,
            1e3 * (time.perf_counter() - received),
        )


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None
