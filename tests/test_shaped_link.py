"""The benchmarks' shaped link really limits the rate, delays each way and forwards intact."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from benchmarks.shaped_link import ShapedLink


@contextmanager
def echo_server() -> Iterator[int]:
    """A loopback TCP server that sends back whatever it reads, one connection at a time."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()


def round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload`` through port, read as many bytes back; (what came back, seconds)."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        received = bytearray()
        start = time.monotonic()
        sender = threading.Thread(target=conn.sendall, args=(payload,))
        sender.start()
        while len(received) < len(payload):
            chunk = conn.recv(1 << 20)
            assert chunk, "the link closed early"
            received += chunk
        elapsed = time.monotonic() - start
        sender.join()
    return bytes(received), elapsed


def test_the_link_limits_the_rate_and_forwards_the_bytes_intact() -> None:
    rate, payload = 20e6, os.urandom(8_000_000)  # 0.4 s each way at 20 MB/s
    with echo_server() as port, ShapedLink(port, rate_bytes=rate, one_way_delay=0.010) as link:
        echoed, elapsed = round_trip(link.port, payload)
        assert echoed == payload
        # both ways pipeline: at least the bytes at the rate, plus the two delays
        assert elapsed >= len(payload) / rate + 0.020
        assert elapsed < 10 * len(payload) / rate  # and it does move them
        # the link counts a chunk once its write has drained: a moment after the client
        # may have read it (a loaded machine showed the race)
        deadline = time.monotonic() + 5
        while link.bytes_down < len(payload) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert link.bytes_up == link.bytes_down == len(payload)


def test_a_small_message_takes_the_round_trip() -> None:
    with echo_server() as port, ShapedLink(port, rate_bytes=125e6, one_way_delay=0.025) as link:
        echoed, elapsed = round_trip(link.port, b"ping")
        assert echoed == b"ping" and elapsed >= 0.050


def test_a_refused_target_closes_the_client_connection() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # bound, never listening: connections are refused
        with ShapedLink(dead_port) as link, socket.create_connection(("127.0.0.1", link.port)) as c:
            c.settimeout(5)
            with suppress(ConnectionResetError):  # an empty read or a reset: closed
                assert c.recv(10) == b""
