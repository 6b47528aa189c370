"""Status, schema and ledger views."""

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from fedmoe.api.deps import AdminDep, CoordinatorDep, PrincipalDep
from fedmoe.api.schemas import error_responses
from fedmoe.schemas import LedgerRow, SchemaInfo, StatusInfo

router = APIRouter(prefix="/v1", tags=["status"])


@router.get("/status", response_model=StatusInfo, responses=error_responses(503))
async def status(
    coordinator: CoordinatorDep,
    _: PrincipalDep,
    workers_limit: Annotated[int, Query(ge=1, le=10000, description="Page size.")] = 1000,
    workers_offset: Annotated[int, Query(ge=0, le=2**62, description="Workers to skip.")] = 0,
) -> StatusInfo:
    """Experts, gateway, a page of the workers (by id), base model and LoRA config."""
    return await run_in_threadpool(
        coordinator.status, workers_offset=workers_offset, workers_limit=workers_limit
    )


@router.get("/schema", response_model=SchemaInfo)
def schema(coordinator: CoordinatorDep, _: PrincipalDep) -> SchemaInfo:
    """Base model, fingerprint, LoRA config and the adapter's tensor names and shapes."""
    return coordinator.schema_info()


@router.get("/ledger", response_model=list[LedgerRow], responses=error_responses(403, 503))
async def ledger(
    coordinator: CoordinatorDep,
    _: AdminDep,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
) -> list[LedgerRow]:
    """The newest ledger rows (accepted and policy-rejected updates), newest first."""
    return await run_in_threadpool(coordinator.ledger_rows, limit)
