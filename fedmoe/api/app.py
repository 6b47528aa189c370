"""The FastAPI application: routers, authentication and error mapping."""

from __future__ import annotations

import logging
import re
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

from fedmoe import __version__
from fedmoe.api.guard import BodyGuardMiddleware
from fedmoe.api.metrics import install_metrics
from fedmoe.api.routes import experts, gateway, health, observe, signatures, status, ui, workers
from fedmoe.api.schemas import ErrorBody, error_responses
from fedmoe.api.security import BearerAuthMiddleware
from fedmoe.coordinator import errors, forget
from fedmoe.coordinator.auth import TokenRegistry
from fedmoe.coordinator.core import CentralCoordinator
from fedmoe.coordinator.signatures import InvalidSignatureError, NoSignatureError

logger = logging.getLogger(__name__)

STATUS_OF: dict[type[Exception], tuple[int, str]] = {
    errors.UnknownExpertError: (404, "unknown_expert"),
    errors.UnknownWorkerError: (409, "unknown_worker"),
    errors.IncompatibleWorkerError: (409, "incompatible_worker"),
    errors.InvalidUpdateError: (422, "invalid_update"),
    errors.StaleUpdateError: (409, "stale_update"),
    errors.RejectedUpdateError: (422, "rejected_update"),
    errors.DuplicateUpdateIdError: (409, "duplicate_update_id"),
    errors.ForbiddenError: (403, "forbidden"),
    errors.TooManyWorkersError: (429, "too_many_workers"),
    errors.ExpertUnavailableError: (503, "expert_unavailable"),
    InvalidSignatureError: (422, "invalid_signature"),
    NoSignatureError: (404, "no_signature"),
    forget.UnknownPartyError: (404, "unknown_worker"),
    forget.WorkerForgottenError: (409, "worker_forgotten"),
    forget.LogUnavailableError: (409, "log_unavailable"),
}
CODE_OF_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid_request",
}
UPLOAD_PATH = re.compile(r"/v1/experts/[^/]+/updates")
SIGNATURE_PATH = re.compile(r"/v1/experts/[^/]+/signature")


def create_app(coordinator: CentralCoordinator, registry: TokenRegistry) -> FastAPI:
    """An app serving ``coordinator``; every request is authenticated by ``registry``."""
    app = FastAPI(title="FedMoE coordinator", version=__version__)
    app.state.coordinator = coordinator
    app.include_router(health.router, responses=error_responses(408, 413))
    for module in (status, workers, experts, gateway, signatures, observe, ui):
        app.include_router(module.router, responses=error_responses(401, 408, 413))

    def limit_for(scope: Scope) -> int:
        if scope["method"] == "POST" and UPLOAD_PATH.fullmatch(scope["path"]):
            return coordinator.max_body_bytes
        if scope["method"] == "POST" and SIGNATURE_PATH.fullmatch(scope["path"]):
            # a signature's JSON grows with the hidden size (mean, var, subspace)
            return max(
                coordinator.signatures.body_limit(), coordinator.settings.max_registration_bytes
            )
        return coordinator.settings.max_registration_bytes

    # Added last, so outermost: the token is checked before the body's size is looked at.
    app.add_middleware(
        BodyGuardMiddleware,
        limit_for=limit_for,
        body_timeout=lambda: coordinator.settings.body_timeout,
    )
    app.add_middleware(
        BearerAuthMiddleware,
        registry=registry,
        revoked=lambda worker_id: coordinator.forgetting.is_revoked(worker_id),
    )
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(errors.CoordinatorError, _coordinator_error)
    for storage_error in (OSError, sqlite3.Error):
        app.add_exception_handler(storage_error, _storage_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    _document_error_bodies(app)
    install_metrics(app, coordinator)  # last: its middleware must be the outermost
    return app


def _document_error_bodies(app: FastAPI) -> None:
    """Make the OpenAPI document describe 422s as sent: an ``ErrorBody``, not FastAPI's default.

    ``_validation_error`` answers ``{"error", "detail": str}``, while FastAPI documents
    every automatic 422 as ``HTTPValidationError`` (``detail`` a list), so clients
    generated from the schema would misread it.
    """
    generate = app.openapi
    default_ref = "#/components/schemas/HTTPValidationError"
    ours = f"#/components/schemas/{ErrorBody.__name__}"

    def replace_refs(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("$ref") == default_ref:
                return {**node, "$ref": ours}
            return {key: replace_refs(value) for key, value in node.items()}
        if isinstance(node, list):
            return [replace_refs(item) for item in node]
        return node

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = _errors_as_json(replace_refs(generate()))
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            schemas.setdefault(ErrorBody.__name__, ErrorBody.model_json_schema())
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _errors_as_json(document: dict[str, Any]) -> dict[str, Any]:
    """Error bodies are JSON even where the success is binary (FastAPI gives every response
    the route's media type)."""
    ours = f"#/components/schemas/{ErrorBody.__name__}"
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for answer in operation.get("responses", {}).values():
                content = answer.get("content", {})
                for media_type, body in list(content.items()):
                    if (
                        media_type != "application/json"
                        and body.get("schema", {}).get("$ref") == ours
                    ):
                        content["application/json"] = content.pop(media_type)
    return document


def _error(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


async def _client_disconnect(request: Request, _: Exception) -> Response:
    # A worker stopped or lost its network mid-upload: normal, nothing was applied.
    client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
    logger.info(
        "%s disconnected during %s %s; nothing applied", client, request.method, request.url.path
    )
    return Response(status_code=400)  # never delivered: the client is gone


async def _coordinator_error(_: Request, error: Exception) -> JSONResponse:
    status, code = STATUS_OF.get(type(error), (400, "bad_request"))
    logger.info("refused (%d %s): %s", status, code, error)
    return _error(status, code, str(error))


async def _storage_error(_: Request, error: Exception) -> JSONResponse:
    # The write-then-commit order means a failed write leaves nothing applied, so the
    # client may simply retry (with the same update id) once the disk is back.
    logger.error("storage failure, request not applied: %r", error)
    detail = (
        f"the coordinator could not persist the request ({error}); nothing was applied, retry later"
    )
    return _error(503, "storage_unavailable", detail, {"Retry-After": "5"})


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    code = CODE_OF_STATUS.get(error.status_code, "error")
    headers = getattr(error, "headers", None)
    if error.status_code == 405:
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    return _error(error.status_code, code, str(error.detail), headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    allowed = []
    for method in ("DELETE", "GET", "PATCH", "POST", "PUT"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def _validation_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()))
        problems.append(f"{where}: {item.get('msg')}")
    return _error(422, "invalid_request", "; ".join(problems) or "invalid request")
