"""The FastAPI app of ``fedmoe serve``: routes, bearer auth, OpenAI-style errors, reloading.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
401 a missing or unknown token, 404 an unknown model or path, 400 a request out of
bounds (``max_tokens`` over the limit, ``n`` other than 1, a prompt too long), 422 a
malformed body (not JSON, a missing or mistyped field: FastAPI's validation status,
which the issue asks for; OpenAI itself answers 400 there), 500 a generation failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from fedmoe import __version__
from fedmoe.api.security import BearerAuthMiddleware
from fedmoe.coordinator.auth import TokenRegistry
from fedmoe.serve import routes
from fedmoe.serve.service import InvalidRequestError, ServeError, Service, UnknownModelError

logger = logging.getLogger(__name__)
UNAUTHORIZED = (
    "missing or invalid bearer token: send 'Authorization: Bearer <token>' (the OpenAI "
    "client's api_key; fedmoe serve takes --auth-token or FEDMOE_AUTH_TOKEN)"
)


class OpenAIBearerAuth(BearerAuthMiddleware):
    """The coordinator's token check, answering 401 in OpenAI's error shape."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse an unauthenticated request before its body is read."""
        if self._principal(scope) is None:
            body = _error_body(UNAUTHORIZED, "authentication_error", None, "invalid_api_key")
            payload = json.dumps(body).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"www-authenticate", b'Bearer realm="fedmoe"'),
                (b"content-length", str(len(payload)).encode()),
            ]
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        await super().http(scope, receive, send)


def create_serve_app(service: Service, registry: TokenRegistry, *, reload: bool = True) -> FastAPI:
    """An app serving ``service``; with ``reload`` it polls the coordinator for new versions."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(service.reload_forever()) if reload and service.source else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="FedMoE serve (OpenAI-compatible)", version=__version__, lifespan=lifespan)
    app.state.service = service
    app.include_router(routes.router)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(OpenAIBearerAuth, registry=registry)
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RuntimeError, _server_error)
    return app


def _error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(
    status: int, message: str, kind: str, param: str | None, code: str | None
) -> JSONResponse:
    return JSONResponse(_error_body(message, kind, param, code), status_code=status)


async def _serve_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ServeError)
    status = 404 if isinstance(error, UnknownModelError) else 400
    if not isinstance(error, UnknownModelError | InvalidRequestError):
        status = 400
    return _error(status, str(error), "invalid_request_error", error.param, error.code)


async def _validation_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems, param = [], None
    for item in error.errors():
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        param = param or (".".join(location) or None)
        problems.append(f"{'.'.join(location) or 'body'}: {item.get('msg')}")
    message = "; ".join(problems) or "invalid request body"
    return _error(422, message, "invalid_request_error", param, "invalid_request")


async def _http_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return _error(error.status_code, str(error.detail), kind, None, None)


async def _server_error(_: Request, error: Exception) -> JSONResponse:
    logger.error("request failed: %s", error)
    return _error(500, str(error), "server_error", None, None)
