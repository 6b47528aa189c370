"""A shaped network link on loopback: an asyncio TCP proxy with a rate limit and a delay.

``ShapedLink(target_port, rate_bytes=125e6, one_way_delay=0.010)`` listens on
127.0.0.1 (a port it picks) and forwards every connection to ``127.0.0.1:target_port``.
Each direction is one link shared by all connections: a token bucket admits bytes at
``rate_bytes`` per second (1 Gbit/s = 125e6 bytes/s) and every admitted chunk is delivered
``one_way_delay`` seconds later (10 ms each way = a 20 ms round trip), in order. A full
delivery queue stops reading from the sender, so TCP's own flow control pushes back as on
a real link. It only ever binds and connects to loopback.

The proxy runs its own event loop on a background thread (``with ShapedLink(...) as link``)
and counts the bytes it moved each way (``link.bytes_up``: client to server). Run
``python -m benchmarks.shaped_link --target-port P`` to put it in front of any server.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import threading
import time
from types import TracebackType

LOOPBACK = "127.0.0.1"
GBIT = 125e6  # bytes per second
CHUNK = 256 * 1024  # bytes read at once: 2 ms at 1 Gbit/s
QUEUE_CHUNKS = 64  # in flight per direction and connection before the reader waits


class TokenBucket:
    """Admit bytes at ``rate`` per second with at most ``burst`` bytes at once.

    ``take`` may run the bucket into debt and then sleeps the debt off, so callers queue
    behind each other in arrival order and the long-run rate is exact however late the
    event loop wakes.
    """

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"rate and burst must be positive, got {rate} and {burst}")
        self.rate, self.burst = rate, burst
        self.tokens, self.last = burst, time.monotonic()

    async def take(self, count: int) -> None:
        """Wait until ``count`` bytes may pass."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= count
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


class Direction:
    """One way of the link: its token bucket, delay and byte counter."""

    def __init__(self, rate: float, delay: float) -> None:
        self.bucket = TokenBucket(rate, burst=CHUNK)
        self.delay = delay
        self.bytes = 0

    async def read(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        """Admit what ``reader`` sends at the link's rate; queue it with its delivery time."""
        while True:
            data = await reader.read(CHUNK)
            if data:
                await self.bucket.take(len(data))
            await queue.put((time.monotonic() + self.delay, data))  # waits when the queue is full
            if not data:  # EOF travels with the same delay, after the last byte
                return

    async def deliver(
        self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        """Write each queued chunk once its delay has passed; pass EOF on."""
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            self.bytes += len(data)

    def tasks(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> list[asyncio.Task[None]]:
        """The reading and the delivering task of one connection in this direction."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
        return [
            asyncio.create_task(self.read(reader, queue)),
            asyncio.create_task(self.deliver(queue, writer)),
        ]


class ShapedLink:
    """The proxy: ``url`` reaches the target through the shaped link; a context manager."""

    def __init__(
        self, target_port: int, *, rate_bytes: float = GBIT, one_way_delay: float = 0.010
    ) -> None:
        self.target_port = target_port
        self.rate_bytes, self.one_way_delay = rate_bytes, one_way_delay
        self.up = Direction(rate_bytes, one_way_delay)
        self.down = Direction(rate_bytes, one_way_delay)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` of the proxy."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def bytes_up(self) -> int:
        """Bytes delivered client → server so far."""
        return self.up.bytes

    @property
    def bytes_down(self) -> int:
        """Bytes delivered server → client so far."""
        return self.down.bytes

    def start(self) -> ShapedLink:
        """Bind a free loopback port and serve on the background thread."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(timeout=10)
        return self

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            client_w.close()  # the client sees the refused connection as a reset
            return
        pumps = self.up.tasks(client_r, server_w) + self.down.tasks(server_r, client_w)
        try:
            # done when both EOFs are delivered; an error on either side (a reset, a closed
            # socket) closes both, as a broken link would
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            pass  # stop(): this connection ends here (asyncio logs a cancelled handler)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (client_w, server_w):
                writer.close()
            if task is not None:
                self._tasks.discard(task)

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop and its thread."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(concurrent.futures.TimeoutError):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ShapedLink:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Put a shaped link in front of a loopback server until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-port", type=int, required=True, help="The loopback server.")
    parser.add_argument("--mbit", type=float, default=1000.0, help="Rate each way, Mbit/s.")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="Round trip, milliseconds.")
    args = parser.parse_args(argv)
    rate, delay = args.mbit * 1e6 / 8, args.rtt_ms / 2e3
    with ShapedLink(args.target_port, rate_bytes=rate, one_way_delay=delay) as link:
        print(f"{link.url} -> {LOOPBACK}:{args.target_port}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
