"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"


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


DecimalInt = Annotated[int, BeforeValidator(_plain_decimal)]
FiniteLoss = Annotated[float, AfterValidator(_finite_non_negative)]


class ErrorBody(BaseModel):
    """Every error: a machine-readable code and a message for humans."""

    error: str
    detail: str


class WorkerRegistration(BaseModel):
    """What a worker declares when it joins."""

    worker_id: str = Field(pattern=ID_PATTERN)
    specialty: str = Field(min_length=1, max_length=64)
    base_model_fingerprint: str = Field(min_length=1, max_length=256)
    lora_config: dict[str, Any]


class RegistrationAck(BaseModel):
    """The coordinator's answer to a registration."""

    worker_id: str
    specialty: str
    expert_version: int
    run_id: str


class UpdateAck(BaseModel):
    """The acknowledgement of an accepted (durably stored) update."""

    update_id: str
    expert: str
    version: int
    staleness: int
    weight: float
    update_norm: float
    clipped: bool
    gateway_version: int
    replayed: bool


class ExpertSummary(BaseModel):
    """An expert's name and current version."""

    name: str
    version: int


class GatewayInfo(BaseModel):
    """The gateway's version and what it is built from."""

    version: int
    merge_method: str
    weights: dict[str, float]
    expert_versions: dict[str, int]
    lora_rank: int
    lora_alpha: float
    router: dict[str, Any] | None = None  # how requests are routed (fedmoe.routing)
