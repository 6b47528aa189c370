"""Worker registration."""

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from fedmoe.api.deps import CoordinatorDep, PrincipalDep, ensure_may_act_as
from fedmoe.api.schemas import ErrorBody, RegistrationAck, WorkerRegistration

router = APIRouter(prefix="/v1", tags=["workers"])


@router.post(
    "/workers",
    response_model=RegistrationAck,
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
async def register_worker(
    body: WorkerRegistration, coordinator: CoordinatorDep, principal: PrincipalDep
) -> RegistrationAck:
    """Register a worker; 404 for an unknown expert, 409 for an incompatible model."""
    ensure_may_act_as(principal, body.worker_id)
    ack = await run_in_threadpool(
        coordinator.register_worker,
        worker_id=body.worker_id,
        specialty=body.specialty,
        fingerprint=body.base_model_fingerprint,
        lora=body.lora_config,
    )
    return RegistrationAck(**ack)
