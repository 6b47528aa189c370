"""The typed answers of the coordinator, shared by its core, its HTTP API and the client.

Only pydantic is imported here, so the client (and the CLI's ``status``) can use
these models without loading FastAPI or torch. The coordinator's core returns them,
every route declares them as its ``response_model``, and ``CoordinatorClient``
parses each answer back into the same class.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt

from fedmoe.fields import ID_PATTERN

MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$"


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be finite, got {value}")
    return value


FiniteFloat = Annotated[float, AfterValidator(_finite)]


class ErrorBody(BaseModel):
    """Every error: a machine-readable code and a message for humans."""

    error: str
    detail: str


class Health(BaseModel):
    """``GET /healthz``."""

    status: str


class LoraConfigBody(BaseModel):
    """A LoRA configuration as it travels (``LoraSettings.to_dict()``); every field required."""

    model_config = ConfigDict(extra="forbid")

    rank: StrictInt = Field(ge=1, le=65536, description="LoRA rank r (an integer >= 1).")
    alpha: FiniteFloat = Field(gt=0, description="LoRA alpha (> 0).")
    dropout: FiniteFloat = Field(ge=0, lt=1, description="Dropout in [0, 1).")
    target_modules: list[Annotated[str, Field(pattern=MODULE_PATTERN)]] = Field(
        min_length=1, max_length=256, description="Names of the adapted modules (non-empty)."
    )
    seed: StrictInt = Field(ge=-(2**63), lt=2**63, description="Seed of the initial adapter.")


class WorkerRegistration(BaseModel):
    """What a worker declares when it joins."""

    model_config = ConfigDict(extra="forbid")

    worker_id: str = Field(pattern=ID_PATTERN)
    specialty: str = Field(min_length=1, max_length=64)
    base_model_fingerprint: str = Field(min_length=1, max_length=256)
    lora_config: LoraConfigBody


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
    buffered: bool = Field(
        False,
        description="Held durably in the expert's FedBuff buffer; the version is unchanged "
        "until the buffer is applied.",
    )
    buffer_fill: int = Field(0, description="Updates in the buffer after this one (fedbuff).")
    # ``fedmoe.state_digest`` of the expert this update made (None from older coordinators):
    # a worker that reproduces it (pulled + weight·Δ) needs no download.
    state_sha256: str | None = None
    active_workers: int = Field(
        1, description="K: the workers active on the expert when this update was weighed."
    )
    settle_version: int | None = Field(
        None,
        description="The expert version at which this update's round is in: this "
        "version plus the other active workers with no update since its base version. A "
        "worker that pulls once it is reached (or its pull wait ends) starts its next "
        "interval from the whole round.",
    )


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
    router: dict[str, Any] | None = Field(
        None, description="How requests are routed to experts (fedmoe.routing), if signed."
    )


class SchemaInfo(BaseModel):
    """What a worker needs to build a compatible adapter (``GET /v1/schema``)."""

    base_model: str
    base_model_fingerprint: str
    lora_config: LoraConfigBody
    peft_config: dict[str, Any]
    tensors: dict[str, list[int]]
    max_body_bytes: int


class StalenessInfo(BaseModel):
    """The update rule's weighting: s(τ), η and the staleness bound."""

    kind: str
    a: float | None
    b: int | None
    server_lr: float | str
    max_staleness: int | None
    grace: bool = Field(
        False, description="Whether s(τ) sees only the staleness beyond the round (τ − (K−1))."
    )


class StrategyStatus(BaseModel):
    """An expert's server strategy and the state it keeps (durable, restored after a crash)."""

    strategy: str = Field(description="'async' or 'fedbuff'.")
    optimizer: str = Field(description="Server optimizer: 'sgd', 'nesterov' or 'adam'.")
    server_lr: float | str = Field(description="η as configured (a number, or a rule's name).")
    momentum: float
    token_weighting: bool
    buffer_size: int | None = Field(description="K of a fedbuff buffer (None for async).")
    buffer_fill: int = Field(description="Updates waiting in the buffer.")
    buffered_update_ids: list[str]
    buffer_age: float | None = Field(description="Seconds since the buffer's first update.")
    optimizer_steps: int = Field(description="Server optimizer steps taken (momentum, Adam).")
    state_seq: int = Field(description="Version of the durable strategy state file (0: none).")
    robust_aggregation: str = Field("none", description="'none', 'median' or 'trimmed_mean'.")
    outlier_test: bool = False
    screen_updates: bool = False  # 'async' with the update screen (ledger verdicts)
    fedavg_rounds: bool = False  # 'async': a complete round ends with FedAvg's token weights
    round_fill: int = Field(
        0, description="Updates of the open round (--fedavg-rounds) until its last one."
    )
    last_verdicts: list[list[str]] = Field(
        default_factory=list,
        description="[update id, 'rejected' or 'down-weighted', reason] of the last buffer "
        "applied (all of them are in the ledger's verdict column).",
    )


class ExpertStatus(BaseModel):
    """One expert in ``GET /v1/status``."""

    version: int
    updates_applied: int
    updates_rejected: int
    workers: list[str] = Field(description="Its workers on this page of the worker list.")
    worker_count: int = Field(description="All workers registered for it.")
    strategy: StrategyStatus | None = None


class WorkerInfo(BaseModel):
    """A registered worker and its counters."""

    specialty: str
    registered_at: float
    last_seen: float
    updates: int
    tokens: int
    last_train_loss: float | None
    last_staleness: int | None
    dp_epsilon: float | None = Field(
        None, description="Privacy spent (ε of example-level DP) its last upload reported."
    )


class StatusInfo(BaseModel):
    """Experts, gateway, one page of the workers, base model and LoRA config."""

    run_id: str
    base_model: str
    base_model_fingerprint: str
    lora_config: LoraConfigBody
    staleness: StalenessInfo
    experts: dict[str, ExpertStatus]
    gateway: GatewayInfo
    workers: dict[str, WorkerInfo] = Field(description="A page of workers, by worker id.")
    workers_total: int = Field(description="Registered workers in all.")
    workers_offset: int
    workers_limit: int


class LedgerRow(BaseModel):
    """One ledger row: an accepted or a policy-rejected update."""

    seq: int
    update_id: str
    worker_id: str
    expert: str
    base_version: int
    staleness: int
    weight: float
    update_norm: float
    clipped: bool
    train_loss: float | None
    num_tokens: int
    accepted: bool
    reason: str | None
    expert_version: int | None
    gateway_version: int | None
    response: str | None = Field(description="The acknowledgement as sent (JSON), if accepted.")
    created_at: float
    body_blake3: str | None = Field(
        None, description="BLAKE3 of the uploaded body, as b3sum prints it."
    )
    body_sha256: str | None = Field(
        None, description="SHA-256 of the uploaded body (rows written before body_blake3)."
    )
    buffered: bool = Field(False, description="Held in a fedbuff buffer when acknowledged.")
    verdict: str | None = Field(
        None, description="Robust aggregation: 'rejected' or 'down-weighted' (see reason)."
    )
    dp_epsilon: float | None = Field(None, description="The worker's spent ε, as reported.")


class ExpertForget(BaseModel):
    """One expert rebuilt without a removed worker's updates (``fedmoe forget``)."""

    expert: str
    old_version: int = Field(description="The expert's version before the rebuild.")
    new_version: int = Field(description="The rebuilt expert's version (old + 1).")
    updates_removed: int = Field(description="The removed worker's updates left out.")
    update_ids: list[str] = Field(description="Their update ids, in log order.")
    lsn: int = Field(description="The write-ahead log record of the rebuild.")


class ForgetReport(BaseModel):
    """``POST /v1/workers/{worker_id}/forget``: what removing a worker did."""

    worker_id: str
    revoked: bool = Field(description="Its token and registration are refused from now on.")
    already_forgotten: bool = Field(description="It had been forgotten before this call.")
    experts: list[ExpertForget] = Field(description="The experts rebuilt without it.")
    updates_removed: int = Field(description="Its updates left out, over all experts.")
    gateway_version: int = Field(description="The gateway's version after the rebuilds.")


class ForgetRow(ExpertForget):
    """``GET /v1/forgets``: one recorded rebuild, newest first."""

    seq: int
    worker_id: str
    created_at: float
