"""The FastAPI application: routers, authentication and error mapping."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedmoe import __version__
from fedmoe.api.routes import experts, gateway, health, signatures, status, workers
from fedmoe.api.schemas import ErrorBody
from fedmoe.api.security import BearerAuthMiddleware
from fedmoe.coordinator import errors
from fedmoe.coordinator.auth import TokenRegistry
from fedmoe.coordinator.core import CentralCoordinator
from fedmoe.coordinator.signatures import InvalidSignatureError, NoSignatureError

logger = logging.getLogger(__name__)

STATUS_OF = {
    errors.UnknownExpertError: (404, "unknown_expert"),
    errors.UnknownWorkerError: (409, "unknown_worker"),
    errors.IncompatibleWorkerError: (409, "incompatible_worker"),
    errors.InvalidUpdateError: (422, "invalid_update"),
    errors.StaleUpdateError: (409, "stale_update"),
    errors.RejectedUpdateError: (422, "rejected_update"),
    errors.DuplicateUpdateIdError: (409, "duplicate_update_id"),
    errors.ForbiddenError: (403, "forbidden"),
    InvalidSignatureError: (422, "invalid_signature"),
    NoSignatureError: (404, "no_signature"),
}
CODE_OF_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid_request",
}


def create_app(coordinator: CentralCoordinator, registry: TokenRegistry) -> FastAPI:
    """An app serving ``coordinator``; every request is authenticated by ``registry``."""
    app = FastAPI(title="FedMoE coordinator", version=__version__)
    app.state.coordinator = coordinator
    for module in (health, status, workers, experts, gateway, signatures):
        app.include_router(module.router)
    app.add_middleware(BearerAuthMiddleware, registry=registry)
    app.add_exception_handler(errors.CoordinatorError, _coordinator_error)
    for storage_error in (OSError, sqlite3.Error):
        app.add_exception_handler(storage_error, _storage_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    _document_error_bodies(app)
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
            document = replace_refs(generate())
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            schemas.setdefault(ErrorBody.__name__, ErrorBody.model_json_schema())
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _error(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


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


async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    code = CODE_OF_STATUS.get(error.status_code, "error")
    return _error(error.status_code, code, str(error.detail), getattr(error, "headers", None))


async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()))
        problems.append(f"{where}: {item.get('msg')}")
    return _error(422, "invalid_request", "; ".join(problems) or "invalid request")
