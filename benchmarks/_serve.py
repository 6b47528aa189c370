"""What the benchmark server processes share: their common flags, a FLOOR app's health
route, and serving an app the way ``fedmoe.api.server.serve`` does.

Each server binds 127.0.0.1 port 0 itself, writes ``{"url", "pid"}`` to ``--url-file``
(``fedmoe.procs.start_server`` waits for it) and serves until SIGTERM; uvicorn runs with
log level ``info`` and its access log on, as the product's server does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fedmoe.coordinator.core import CentralCoordinator


def server_parser(description: str, experts: str) -> argparse.ArgumentParser:
    """The flags every benchmark server takes (``experts``: the default of ``--experts``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--url-file", type=Path, required=True)
    parser.add_argument("--experts", default=experts)
    parser.add_argument("--floor", action="store_true")
    return parser


def floor_base() -> FastAPI:
    """An empty FastAPI app with the ``/healthz`` route the process harness polls."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def serve(url_file: Path, floor: FastAPI | None, coordinator: CentralCoordinator | None) -> None:
    """Serve the FLOOR app or ``coordinator``'s API on a fresh port until SIGTERM (the
    coordinator is closed on the way out)."""
    import uvicorn

    from fedmoe.api.app import create_app
    from fedmoe.api.server import listen_socket, write_url_file
    from fedmoe.coordinator.auth import TokenRegistry
    from fedmoe.parallel import one_thread_per_kernel

    if floor is None:
        assert coordinator is not None, "serve a FLOOR app or a coordinator"
        one_thread_per_kernel()  # as ``fedmoe coordinator`` runs
        app = create_app(coordinator, TokenRegistry({}))
    else:
        app = floor
    sock = listen_socket("127.0.0.1", 0)  # the real server's own listener
    write_url_file(url_file, f"http://127.0.0.1:{sock.getsockname()[1]}")
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=10)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if coordinator is not None:
            coordinator.close()
        sys.stdout.flush()
