"""Liveness."""

from fastapi import APIRouter

from fedmoe.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Always ``{"status": "ok"}`` while the process serves requests."""
    return Health(status="ok")
