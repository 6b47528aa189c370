"""Run the coordinator under uvicorn."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from fedmoe.api.app import create_app
from fedmoe.api.guard import header_timeout_protocol
from fedmoe.coordinator.auth import TokenRegistry
from fedmoe.coordinator.bootstrap import open_coordinator
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.parallel import one_thread_per_kernel

logger = logging.getLogger(__name__)


def serve(settings: CoordinatorSettings) -> None:
    """Open (or resume) the state dir and serve the API until SIGINT/SIGTERM."""
    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    registry = TokenRegistry.from_sources(token, settings.tokens_file)
    listener = listen_socket(settings.host, settings.port)  # a busy port touches no state
    coordinator = open_coordinator(settings)  # (a base model's facts: every thread)
    one_thread_per_kernel()  # serving: its tensor work is split over threads by fedmoe.parallel
    app = create_app(coordinator, registry)
    scheme = "https" if settings.ssl_certfile else "http"
    port = listener.getsockname()[1]  # the port it got, when asked for port 0
    logger.info(
        "coordinator on %s://%s:%d (auth %s, state dir %s)",
        scheme,
        settings.host,
        port,
        "on" if registry.enabled else "off",
        settings.state_dir,
    )
    if settings.url_file is not None:
        write_url_file(settings.url_file, f"{scheme}://{_connectable(settings.host)}:{port}")
    # uvicorn re-raises SIGTERM after its graceful shutdown; make that a SystemExit so the
    # `finally` below still closes the ledger and flushes the gateway file.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        config = uvicorn_config(app, settings, log_level="info", timeout_graceful_shutdown=10)
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        listener.close()
        coordinator.close()
        if settings.url_file is not None:
            settings.url_file.unlink(missing_ok=True)
        logger.info("coordinator stopped; state saved in %s", settings.state_dir)


def uvicorn_config(app: ASGIApp, settings: CoordinatorSettings, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: TLS and the slow-client limits of ``settings``."""
    return uvicorn.Config(
        app,
        http=header_timeout_protocol(settings.header_timeout),
        # h11 holds at most 16 KiB of an incomplete request head (then 400 and close)
        h11_max_incomplete_event_size=16 * 1024,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        **options,
    )


def _connectable(host: str) -> str:
    """A host a local client can connect to for a listener on ``host``."""
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def write_url_file(path: Path, url: str) -> None:
    """``{"url", "pid"}`` as JSON, renamed into place so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    os.replace(temporary, path)


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``; OSError names the address when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP as uvicorn's own bind makes it: asyncio sets TCP_NODELAY on accepted
    # sockets only for such listeners, and without it small answers wait on Nagle.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)
