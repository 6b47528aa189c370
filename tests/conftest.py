"""Shared fixtures: a real coordinator served by uvicorn on a free loopback port.

The coordinator runs in this process (a uvicorn server in a background thread),
so tests talk to it over real HTTP on 127.0.0.1 while its state dir is a tmp dir
they can inspect. ``start_live_coordinator`` builds it exactly as
``fedmoe.api.server.serve`` does: settings → token registry → coordinator → app.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from fedmoe.api.app import create_app
from fedmoe.api.server import listen_socket, uvicorn_config
from fedmoe.coordinator.auth import TokenRegistry
from fedmoe.coordinator.bootstrap import open_coordinator
from fedmoe.coordinator.core import CentralCoordinator
from fedmoe.coordinator.settings import CoordinatorSettings


def _session_cache_dir() -> str:
    """One base-facts cache per test session (the xdist workers inherit the controller's),
    never the user's ``~/.cache/fedmoe``; removed by the process that made it."""
    cache = os.environ.get("FEDMOE_TEST_SESSION_CACHE")
    if cache is None:
        cache = tempfile.mkdtemp(prefix="fedmoe-test-cache-")
        os.environ["FEDMOE_TEST_SESSION_CACHE"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    return cache


# Set before any settings are read or process harness environment (fedmoe.procs.ENV) is built.
os.environ["FEDMOE_CACHE_DIR"] = _session_cache_dir()


@dataclass
class LiveCoordinator:
    """A running coordinator: its URL, state dir and in-process objects."""

    url: str
    state_dir: Path
    settings: CoordinatorSettings
    coordinator: CentralCoordinator
    server: uvicorn.Server
    thread: threading.Thread
    token: str | None = None
    _stopped: bool = field(default=False, repr=False)

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        """An httpx client for this server; ``token`` defaults to the shared one (if any)."""
        token = token if token is not None else self.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    @property
    def adapters_dir(self) -> Path:
        """Where the adapter files live."""
        return self.state_dir / "adapters"

    def stop(self) -> None:
        """Stop uvicorn, then flush and close the coordinator (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self.server.should_exit = True
        self.thread.join(timeout=15)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout=5)
        self.coordinator.close()


def start_live_coordinator(
    state_dir: Path, *, startup_timeout: float = 30.0, **settings: Any
) -> LiveCoordinator:
    """Open ``state_dir`` with ``CoordinatorSettings(**settings)`` and serve it on loopback.

    Auth and TLS options are read from the settings (``auth_token``, ``tokens_file``,
    ``ssl_certfile``/``ssl_keyfile``) as the real server does; the URL is https when
    a certificate is given. FEDMOE_* environment variables never switch auth on.
    """
    settings.setdefault("auth_token", None)
    settings.setdefault("tokens_file", None)
    settings.setdefault("gateway_file_interval", 0.0)  # tests read the gateway file at once
    config = CoordinatorSettings(host="127.0.0.1", port=0, state_dir=Path(state_dir), **settings)
    token = config.auth_token.get_secret_value() if config.auth_token else None
    registry = TokenRegistry.from_sources(token, config.tokens_file)
    coordinator = open_coordinator(config)
    app = create_app(coordinator, registry)
    sock = listen_socket("127.0.0.1", 0)  # bound here: no race for a "free" port
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn_config(
            app, config, log_level="warning", lifespan="off", timeout_graceful_shutdown=2
        )
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            coordinator.close()
            sock.close()
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.01)
    scheme = "https" if config.ssl_certfile else "http"
    return LiveCoordinator(
        url=f"{scheme}://127.0.0.1:{port}",
        state_dir=Path(state_dir),
        settings=config,
        coordinator=coordinator,
        server=server,
        thread=thread,
        token=token,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the costly modules first, the costliest first (``pytest.mark.heavy(seconds)``).

    Under ``pytest -n 2`` each xdist worker takes whole modules in this order
    (``--dist loadfile --no-loadscope-reorder``, pyproject.toml), so the long ones start
    early and the two workers finish together. Mark whole modules only (``pytestmark``):
    the sort is stable and keeps each module's tests together.
    """

    def cost(item: pytest.Item) -> float:
        mark = item.get_closest_marker("heavy")
        return -float(mark.args[0]) if mark else 0.0

    items.sort(key=cost)
    _unique_node_ids(items)


def _unique_node_ids(items: list[pytest.Item]) -> None:
    """Give schemathesis' generated tests their operation in their node id.

    Under pytest 9 they share one id (``test_no_server_errors``; the operation is only in
    the name), and ``--dist loadfile`` keys tests by id: it would run one of the twenty.
    Any id still repeated afterwards is an error, not a test silently left out.
    """
    counts = Counter(item.nodeid for item in items)
    for item in items:
        node_id = getattr(item, "_id", None)  # pytest >= 9: a structured NodeId
        if counts[item.nodeid] > 1 and "[" in item.name and node_id is not None:
            operation = item.name.partition("[")[2].removesuffix("]")
            item._id = dataclasses.replace(node_id, params=operation)
    repeated = sorted(n for n, c in Counter(item.nodeid for item in items).items() if c > 1)
    if repeated:
        raise pytest.UsageError(f"tests share a node id (xdist would run one): {repeated}")


StartCoordinator = Callable[..., LiveCoordinator]


def _factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StartCoordinator]:
    started: list[LiveCoordinator] = []

    def start(state_dir: Path | None = None, **settings: Any) -> LiveCoordinator:
        live = start_live_coordinator(
            state_dir or tmp_path_factory.mktemp("coordinator-state"), **settings
        )
        started.append(live)
        return live

    try:
        yield start
    finally:
        for live in reversed(started):
            live.stop()


@pytest.fixture
def live_coordinator_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StartCoordinator]:
    """``start(state_dir=None, **settings) -> LiveCoordinator``; all are stopped after the test."""
    yield from _factory(tmp_path_factory)


@pytest.fixture(scope="module")
def module_coordinator_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StartCoordinator]:
    """Like ``live_coordinator_factory``, but servers live until the module's tests end."""
    yield from _factory(tmp_path_factory)


@pytest.fixture
def live_coordinator(live_coordinator_factory: StartCoordinator) -> LiveCoordinator:
    """A coordinator with default settings (tiny model, no auth) on a tmp state dir."""
    return live_coordinator_factory()


RawHttp = Callable[..., tuple[int, dict[str, str], bytes]]


def raw_http_request(
    url: str,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes = b"",
    *,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """Send exactly these bytes over a plain socket; return (status, headers, body).

    Unlike an HTTP client it never sends more body than given, whatever
    Content-Length says, so a test can show that the server answers without
    waiting for the rest of the body.
    """
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        reply = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in header_lines)
        }
        length = int(reply.get("content-length", len(rest)))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(status_line.split()[1]), reply, rest[:length]


@pytest.fixture
def raw_http() -> RawHttp:
    """``raw_http(url, method, path, headers, body=b"", timeout=10)``: see ``raw_http_request``."""
    return raw_http_request
