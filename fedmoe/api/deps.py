"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from fedmoe.api.security import UNAUTHORIZED_DETAIL
from fedmoe.coordinator.auth import Principal
from fedmoe.coordinator.core import CentralCoordinator


def get_coordinator(request: Request) -> CentralCoordinator:
    """The coordinator this app serves."""
    return request.app.state.coordinator


def get_principal(request: Request) -> Principal:
    """The caller, as authenticated by ``BearerAuthMiddleware``."""
    principal = request.scope.get("state", {}).get("principal")
    if principal is None or principal.role == "anonymous":
        raise HTTPException(status_code=401, detail=UNAUTHORIZED_DETAIL)
    return principal


def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    """Only an admin token passes."""
    if principal.role != "admin":
        raise HTTPException(status_code=403, detail="this endpoint needs an admin token")
    return principal


CoordinatorDep = Annotated[CentralCoordinator, Depends(get_coordinator)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(require_admin)]


def ensure_may_act_as(principal: Principal, worker_id: str) -> None:
    """403 unless the caller may act as ``worker_id``."""
    if not principal.may_act_as(worker_id):
        raise HTTPException(
            status_code=403,
            detail=f"this token belongs to worker {principal.worker_id!r}, not {worker_id!r}",
        )
