"""Observability: Prometheus ``/metrics``, federated evaluation reports and history."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from fedmoe.api.deps import CoordinatorDep, PrincipalDep, ensure_may_act_as
from fedmoe.api.metrics import CoordinatorMetrics
from fedmoe.api.observe_schemas import EvalKind, EvalReportBody, EvalRow, Rejection, UpdateRow
from fedmoe.api.schemas import SQLITE_MAX_INT, error_responses
from fedmoe.coordinator.core import CentralCoordinator
from fedmoe.coordinator.evaluations import EvalReport, check_report

router = APIRouter(tags=["observability"])
# 400: a body that is not JSON at all; 503: the state dir could not be written
ERRORS = error_responses(400, 403, 404, 409, 422, 503)
Limit = Annotated[int, Query(ge=1, le=10000)]


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request, _: PrincipalDep) -> Response:
    """Prometheus text exposition of this coordinator's metrics."""
    registry: CoordinatorMetrics = request.app.state.metrics
    return Response(registry.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/metrics/evaluations", response_model=list[EvalRow], responses=ERRORS)
async def report_evaluation(
    body: EvalReportBody, coordinator: CoordinatorDep, principal: PrincipalDep
) -> list[EvalRow]:
    """Record a worker's federated evaluation (a worker token reports only as itself)."""
    ensure_may_act_as(principal, body.worker_id, body.expert)
    rows = await run_in_threadpool(_record, coordinator, body.to_report())
    return [EvalRow(**row) for row in rows]


def _record(coordinator: CentralCoordinator, report: EvalReport) -> list[dict[str, Any]]:
    check_report(coordinator, report)
    return coordinator.evaluations.record(report)


@router.get("/v1/metrics/history", response_model=list[EvalRow])
async def history(
    coordinator: CoordinatorDep,
    _: PrincipalDep,
    expert: str | None = None,
    worker_id: str | None = None,
    kind: EvalKind | None = None,
    since: Annotated[float | None, Query(description="Unix time, inclusive.")] = None,
    until: Annotated[float | None, Query(description="Unix time, inclusive.")] = None,
    limit: Limit = 1000,
) -> list[EvalRow]:
    """Federated evaluation results, newest first, filtered by expert, worker, kind, time."""
    rows = await run_in_threadpool(
        coordinator.evaluations.history,
        expert=expert,
        worker_id=worker_id,
        kind=kind,
        since=since,
        until=until,
        limit=limit,
    )
    return [EvalRow(**row) for row in rows]


@router.get("/v1/metrics/updates", response_model=list[UpdateRow])
async def updates(
    coordinator: CoordinatorDep,
    _: PrincipalDep,
    after: Annotated[
        int, Query(ge=0, le=SQLITE_MAX_INT, description="Only rows with a larger seq.")
    ] = 0,
    limit: Limit = 2000,
) -> list[UpdateRow]:
    """Ledger rows for charts (train loss, staleness, weight), newest first."""
    rows = await run_in_threadpool(coordinator.evaluations.updates, after=after, limit=limit)
    return [UpdateRow(**row) for row in rows]


@router.get("/v1/metrics/rejections", response_model=list[Rejection])
def rejections(request: Request, _: PrincipalDep, limit: Limit = 50) -> list[Rejection]:
    """The most recent refused uploads (any reason) since this coordinator started."""
    registry: CoordinatorMetrics = request.app.state.metrics
    return [Rejection(**item) for item in list(registry.rejections)[:limit]]
