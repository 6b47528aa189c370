"""Bodies of the observability API: federated evaluation reports and their history."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedmoe.api.schemas import ID_PATTERN, SQLITE_MAX_INT, FiniteLoss
from fedmoe.coordinator.evaluations import EvalReport, EvalResult
from fedmoe.coordinator.versions import MAX_NUM_TOKENS

EvalKind = Literal["expert", "gateway", "routed"]


class EvalResultBody(BaseModel):
    """One model measured on the worker's own validation set (aggregates only)."""

    model_config = ConfigDict(extra="forbid")

    kind: EvalKind = Field(description="expert: the worker's expert; gateway: the merged one.")
    loss: FiniteLoss = Field(description="Mean loss per target token (nats).")
    tokens: int = Field(ge=1, le=MAX_NUM_TOKENS, description="Target tokens it was measured on.")
    examples: int = Field(ge=1, le=10**9, description="Validation examples used.")
    routing_accuracy: float | None = Field(
        None, ge=0, le=1, description="Routed gateway only: share of prompts routed home."
    )


class EvalReportBody(BaseModel):
    """A worker's evaluation report, with the versions it was measured on."""

    model_config = ConfigDict(extra="forbid")

    worker_id: str = Field(pattern=ID_PATTERN)
    expert: str = Field(min_length=1, max_length=64, description="The worker's specialty.")
    expert_version: int = Field(
        ge=0, le=SQLITE_MAX_INT, description="Version of the expert evaluated."
    )
    gateway_version: int = Field(
        ge=0, le=SQLITE_MAX_INT, description="Version of the gateway evaluated."
    )
    final: bool = Field(False, description="Sent when the worker stops.")
    results: list[EvalResultBody] = Field(min_length=1, max_length=8)

    def to_report(self) -> EvalReport:
        """The coordinator's value object."""
        return EvalReport(
            worker_id=self.worker_id,
            expert=self.expert,
            expert_version=self.expert_version,
            gateway_version=self.gateway_version,
            final=self.final,
            results=tuple(EvalResult(**r.model_dump()) for r in self.results),
        )


class EvalRow(BaseModel):
    """One stored evaluation result."""

    seq: int
    created_at: float
    worker_id: str
    expert: str
    kind: str
    loss: float
    tokens: int
    examples: int
    expert_version: int
    gateway_version: int
    routing_accuracy: float | None
    final: bool


class UpdateRow(BaseModel):
    """One ledger row as the dashboard needs it (accepted, or refused by policy)."""

    seq: int
    created_at: float
    worker_id: str
    expert: str
    accepted: bool
    reason: str | None
    staleness: int
    weight: float
    train_loss: float | None
    num_tokens: int
    expert_version: int | None
    verdict: str | None = None  # robust aggregation: 'rejected' or 'down-weighted'
    dp_epsilon: float | None = None  # the worker's spent ε, as reported


class Rejection(BaseModel):
    """A refused upload, as answered (kept in memory, newest first)."""

    time: float
    expert: str
    worker_id: str
    status: int
    reason: str
    detail: str
