"""Worker registration and removal (``fedmoe forget``)."""

from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from fedmoe.api.deps import AdminDep, CoordinatorDep, PrincipalDep, ensure_may_act_as
from fedmoe.api.schemas import ID_PATTERN, RegistrationAck, WorkerRegistration, error_responses
from fedmoe.schemas import ForgetReport, ForgetRow

router = APIRouter(prefix="/v1", tags=["workers"])


@router.post(
    "/workers",
    response_model=RegistrationAck,
    responses=error_responses(400, 403, 404, 409, 429, 503),
)
async def register_worker(
    body: WorkerRegistration, coordinator: CoordinatorDep, principal: PrincipalDep
) -> RegistrationAck:
    """Register a worker: 404 unknown expert, 409 incompatible model or a forgotten worker
    id (``worker_forgotten``), 429 too many workers.

    A worker already registered for another expert moves only with an admin token (403).
    """
    ensure_may_act_as(principal, body.worker_id, body.specialty)

    def register() -> RegistrationAck:
        coordinator.forgetting.check_registration(body.worker_id)
        return coordinator.register_worker(body, may_change_expert=principal.is_admin)

    return await run_in_threadpool(register)


@router.post(
    "/workers/{worker_id}/forget",
    response_model=ForgetReport,
    responses=error_responses(403, 404, 409, 503),
)
async def forget_worker(
    worker_id: Annotated[str, Path(pattern=ID_PATTERN, description="The worker to remove.")],
    coordinator: CoordinatorDep,
    _: AdminDep,
) -> ForgetReport:
    """Remove a worker (admin): revoke its token and registration for good, and rebuild
    every expert it contributed to without its updates, each as a new version.

    404 ``unknown_worker``: it never registered or uploaded. 409 ``log_unavailable``: the
    log the rebuild needs was dropped (``delta_retention=drop``); nothing changed.
    """
    return await run_in_threadpool(coordinator.forgetting.forget, worker_id)


@router.get("/forgets", response_model=list[ForgetRow], responses=error_responses(403, 503))
async def forgets(
    coordinator: CoordinatorDep,
    _: AdminDep,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
) -> list[ForgetRow]:
    """The experts rebuilt without a removed worker (admin), newest first."""
    return await run_in_threadpool(coordinator.forgetting.rows, limit)
