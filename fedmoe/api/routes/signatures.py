"""Domain signatures: a worker's upload, one expert's signature, and all of them for a router."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from fedmoe.api.deps import CoordinatorDep, PrincipalDep, ensure_may_act_as
from fedmoe.api.schemas import ID_PATTERN, error_responses
from fedmoe.coordinator import signatures
from fedmoe.coordinator.versions import MAX_NUM_TOKENS
from fedmoe.ood import MAX_QUANTILE, MAX_RANK, MAX_VARIANCE, QUANTILE_LEVELS

router = APIRouter(tags=["signatures"])
# 400: a body that is not JSON at all; 503: the state dir could not be written
ERRORS = error_responses(400, 403, 404, 409, 422, 503)


Variance = Annotated[float, Field(ge=0, le=MAX_VARIANCE, allow_inf_nan=False)]
# Rows of an orthonormal basis: entries within [-1, 1] (a little slack for float rounding).
Direction = list[Annotated[float, Field(ge=-1.001, le=1.001, allow_inf_nan=False)]]
Quantile = Annotated[float, Field(ge=0, le=MAX_QUANTILE, allow_inf_nan=False)]


class SubspaceBody(BaseModel):
    """Out-of-domain statistics (format 2): top principal directions and distance quantiles."""

    basis: list[Direction] = Field(
        min_length=1, max_length=MAX_RANK, description="Orthonormal principal directions."
    )
    eigenvalues: list[Variance] = Field(
        min_length=1, max_length=MAX_RANK, description="Variance along each direction."
    )
    residual: Variance = Field(description="Mean variance per dimension off the directions.")
    quantiles: list[Quantile] = Field(
        min_length=len(QUANTILE_LEVELS),
        max_length=len(QUANTILE_LEVELS),
        description=f"The domain's own subspace distances at quantiles {QUANTILE_LEVELS}.",
    )


class SignatureBody(BaseModel):
    """A domain signature: aggregate statistics of unit features, never single examples."""

    mean: list[float] = Field(description="Mean of the unit feature vectors.")
    var: list[float] = Field(description="Per-dimension variance of the unit feature vectors.")
    count: int = Field(le=MAX_NUM_TOKENS, description="How many examples the aggregate is over.")
    featurizer: dict[str, Any] = Field(description="Featurizer version and settings.")
    base_fingerprint: str = Field(description="Fingerprint of the base model used.")
    format: int | None = Field(
        None, ge=1, le=2, description="1: mean, var, count (older workers); 2: with subspace."
    )
    subspace: SubspaceBody | None = Field(
        None, description="Out-of-domain statistics (format 2; absent in format 1)."
    )


class SignatureUpload(BaseModel):
    """``POST /v1/experts/{name}/signature``: a worker's signature of its domain."""

    worker_id: str = Field(pattern=ID_PATTERN)
    signature: SignatureBody


class SignatureAck(BaseModel):
    """The stored signature's count, and the expert's total over its workers."""

    expert: str
    worker_id: str
    count: int
    expert_count: int
    workers: list[str]


class ExpertSignature(SignatureBody):
    """An expert's signature: its workers' signatures combined by count."""

    workers: list[str]


class SignaturesInfo(BaseModel):
    """Everything a router needs: featurizer, decision settings and every signature."""

    featurizer: dict[str, Any]
    base_fingerprint: str
    min_count: int
    router: dict[str, Any]
    signatures: dict[str, ExpertSignature]
    missing: list[str] = Field(description="Experts no worker has sent a signature for.")


@router.post("/v1/experts/{name}/signature", response_model=SignatureAck, responses=ERRORS)
async def submit_signature(
    name: str, upload: SignatureUpload, coordinator: CoordinatorDep, principal: PrincipalDep
) -> SignatureAck:
    """Store a worker's domain signature (written to disk before this answers)."""
    ensure_may_act_as(principal, upload.worker_id, name)
    ack = await run_in_threadpool(
        signatures.submit_signature,
        coordinator,
        name,
        upload.worker_id,
        upload.signature.model_dump(),
    )
    return SignatureAck(**ack)


@router.get("/v1/experts/{name}/signature", response_model=ExpertSignature, responses=ERRORS)
def expert_signature(name: str, coordinator: CoordinatorDep, _: PrincipalDep) -> ExpertSignature:
    """The expert's combined signature (404 while none of its workers has sent one)."""
    return ExpertSignature(**signatures.expert_signature(coordinator, name))


@router.get("/v1/signatures", response_model=SignaturesInfo)
def all_signatures(coordinator: CoordinatorDep, _: PrincipalDep) -> SignaturesInfo:
    """Every expert's signature plus the featurizer and router settings, in one call."""
    return SignaturesInfo(**signatures.signatures_payload(coordinator))
