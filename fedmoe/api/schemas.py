"""Request parameters and documented answers of the HTTP API.

The bodies themselves live in ``fedmoe.schemas`` (shared with the core and the
client); this module adds what only HTTP has: header types and error responses.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

from fedmoe.fields import ID_PATTERN
from fedmoe.schemas import (
    ErrorBody,
    ExpertSummary,
    GatewayInfo,
    RegistrationAck,
    UpdateAck,
    WorkerRegistration,
)

__all__ = [
    "ID_PATTERN",
    "DecimalInt",
    "ErrorBody",
    "ExpertSummary",
    "FiniteLoss",
    "GatewayInfo",
    "RegistrationAck",
    "UpdateAck",
    "WorkerRegistration",
    "error_responses",
]


def _plain_decimal(value: object) -> object:
    # pydantic's lax int parsing would take "0.0", "+0" or "1_000" from a header; a
    # version or a token count is written in plain digits or it is a client bug.
    if isinstance(value, str) and not re.fullmatch(r"-?[0-9]+", value):
        raise ValueError(f"must be a plain decimal integer, got {value!r}")
    return value


def _finite_non_negative(value: float) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"must be finite and >= 0, got {value}")
    return value


# the largest integer SQLite stores; a query bound beyond it would overflow the driver
SQLITE_MAX_INT = 2**63 - 1
DecimalInt = Annotated[int, BeforeValidator(_plain_decimal)]
# "minimum: 0" in the OpenAPI document says what the header accepts; the check itself is
# _finite_non_negative's, whose message also covers nan and inf
FiniteLoss = Annotated[
    float, Field(json_schema_extra={"minimum": 0}), AfterValidator(_finite_non_negative)
]

ERROR_MEANING = {
    400: "Malformed request.",
    401: "Missing or invalid bearer token (the connection is closed).",
    403: "The token may not do this (before any body: the connection is closed).",
    404: "No such expert.",
    408: "The request body stalled for longer than body_timeout (the connection is closed).",
    409: "Conflict with the coordinator's state (see the error code).",
    413: "The body exceeds this route's limit (the connection is closed).",
    422: "Invalid parameters or body.",
    429: "The coordinator has max_workers registered workers.",
    503: "Storage unavailable; nothing was applied; retry later (Retry-After).",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each an ``ErrorBody``."""
    return {code: {"model": ErrorBody, "description": ERROR_MEANING[code]} for code in codes}
