"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fedmoe.api.guard import CLOSE
from fedmoe.api.security import UNAUTHORIZED_DETAIL
from fedmoe.coordinator.auth import Principal
from fedmoe.coordinator.core import CentralCoordinator

# Documents the bearer scheme in OpenAPI; BearerAuthMiddleware has checked the token
# before any route (and before any body) is reached.
bearer_scheme = HTTPBearer(auto_error=False, description="A token of the coordinator.")


def get_coordinator(request: Request) -> CentralCoordinator:
    """The coordinator this app serves."""
    coordinator: CentralCoordinator = request.app.state.coordinator
    return coordinator


def get_principal(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> Principal:
    """The caller, as authenticated by ``BearerAuthMiddleware``."""
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    if principal is None or principal.role == "anonymous":
        raise HTTPException(status_code=401, detail=UNAUTHORIZED_DETAIL, headers=CLOSE)
    return principal


def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    """Only an admin token passes."""
    if not principal.is_admin:
        raise HTTPException(status_code=403, detail="this endpoint needs an admin token")
    return principal


CoordinatorDep = Annotated[CentralCoordinator, Depends(get_coordinator)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(require_admin)]


def ensure_may_act_as(principal: Principal, worker_id: str, expert: str) -> None:
    """403 unless the caller may act as ``worker_id`` and train ``expert``."""
    if not principal.may_act_as(worker_id):
        raise HTTPException(
            status_code=403,
            detail=f"this token belongs to worker {principal.worker_id!r}, not {worker_id!r}",
        )
    if not principal.may_train(expert):
        allowed = ", ".join(principal.experts or ())
        raise HTTPException(
            status_code=403,
            detail=f"worker {worker_id!r} may train only {allowed}, not {expert!r}",
        )
