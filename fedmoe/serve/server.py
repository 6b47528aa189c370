"""Run ``fedmoe serve`` under uvicorn."""

from __future__ import annotations

import logging
import signal

import uvicorn

from fedmoe.api.server import _exit_on_sigterm, listen_socket
from fedmoe.coordinator.auth import TokenRegistry
from fedmoe.serve.app import create_serve_app
from fedmoe.serve.service import Service
from fedmoe.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


def token_registry(settings: ServeSettings) -> TokenRegistry:
    """The same tokens the coordinator accepts: a shared token and/or a tokens file."""
    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    return TokenRegistry.from_sources(token, settings.tokens_file)


def serve(settings: ServeSettings) -> None:
    """Load the models, then answer OpenAI-compatible requests until SIGINT/SIGTERM."""
    registry = token_registry(settings)
    listener = listen_socket(settings.host, settings.port)  # a busy port fails before loading
    service = Service.open(settings)
    app = create_serve_app(service, registry)
    scheme = "https" if settings.ssl_certfile else "http"
    logger.info(
        "serving %s on %s://%s:%d (auth %s)",
        ", ".join(service.model_names()),
        scheme,
        settings.host,
        settings.port,
        "on" if registry.enabled else "off",
    )
    # uvicorn re-raises SIGTERM after its graceful shutdown; as for the coordinator, that
    # becomes a SystemExit(0) so the engine is closed and the exit status is clean.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        config = uvicorn.Config(
            app,
            log_level="info",
            ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
            ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
            timeout_graceful_shutdown=10,
        )
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        listener.close()
        service.close()
