"""Worker registration."""

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from fedmoe.api.deps import CoordinatorDep, PrincipalDep, ensure_may_act_as
from fedmoe.api.schemas import RegistrationAck, WorkerRegistration, error_responses

router = APIRouter(prefix="/v1", tags=["workers"])


@router.post(
    "/workers",
    response_model=RegistrationAck,
    responses=error_responses(400, 403, 404, 409, 429, 503),
)
async def register_worker(
    body: WorkerRegistration, coordinator: CoordinatorDep, principal: PrincipalDep
) -> RegistrationAck:
    """Register a worker: 404 unknown expert, 409 incompatible model, 429 too many workers.

    A worker already registered for another expert moves only with an admin token (403).
    """
    ensure_may_act_as(principal, body.worker_id, body.specialty)
    return await run_in_threadpool(
        lambda: coordinator.register_worker(body, may_change_expert=principal.is_admin)
    )
