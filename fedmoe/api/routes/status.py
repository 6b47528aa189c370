"""Status, schema and ledger views."""

from typing import Any

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from fedmoe.api.deps import AdminDep, CoordinatorDep, PrincipalDep

router = APIRouter(prefix="/v1", tags=["status"])


@router.get("/status")
async def status(coordinator: CoordinatorDep, _: PrincipalDep) -> dict[str, Any]:
    """Experts, gateway, workers, base model and LoRA config."""
    return await run_in_threadpool(coordinator.status)


@router.get("/schema")
def schema(coordinator: CoordinatorDep, _: PrincipalDep) -> dict[str, Any]:
    """Base model, fingerprint, LoRA config and the adapter's tensor names and shapes."""
    return coordinator.schema_info()


@router.get("/ledger")
async def ledger(
    coordinator: CoordinatorDep, _: AdminDep, limit: int = Query(100, ge=1, le=10000)
) -> list[dict[str, Any]]:
    """The newest ledger rows (accepted and policy-rejected updates), newest first."""
    return await run_in_threadpool(coordinator.ledger.updates, limit=limit)
