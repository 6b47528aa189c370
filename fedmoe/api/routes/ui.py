"""The live dashboard: static files shipped in the package, served without auth.

The page itself holds no data; it asks for a token and calls the authenticated
``/v1/...`` endpoints with it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

from fedmoe.api.deps import CoordinatorDep

router = APIRouter(include_in_schema=False)
STATIC = Path(str(resources.files("fedmoe.api") / "static"))
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
HEADERS = {
    "Cache-Control": "no-cache",
    # Everything comes from here: no CDN, no inline script, no framing by other sites.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


@router.get("/")
def root() -> RedirectResponse:
    """The dashboard is the coordinator's home page."""
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
def ui_root() -> RedirectResponse:
    """``/ui`` → ``/ui/`` so the page's relative links resolve."""
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/auth.json")
def auth_required(coordinator: CoordinatorDep) -> dict[str, bool]:
    """Whether the page must ask for a token (what a 401 would tell anyway)."""
    return {"token_required": coordinator.settings.auth_enabled}


@router.get("/ui/{name}")
@router.get("/ui/", name="dashboard")
def static_file(name: str = "index.html") -> FileResponse:
    """One of the dashboard's files (a fixed set: no path traversal is possible)."""
    path = STATIC / name
    if "/" in name or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise HTTPException(status_code=404, detail=f"no dashboard file {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)
