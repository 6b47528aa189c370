"""ASGI middleware that authenticates every request before any of its body is read."""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from fedmoe.api.asgi import HttpMiddleware
from fedmoe.coordinator.auth import Principal, TokenRegistry

OPEN_PATHS = {"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/", "/ui"}
# The dashboard's static files: the page asks for a token and sends it with its data calls.
OPEN_PREFIXES = ("/ui/",)
ADMIN = Principal(role="admin")
UNAUTHORIZED_DETAIL = (
    "missing or invalid bearer token: send 'Authorization: Bearer <token>' "
    "(fedmoe workers and the CLI take --auth-token or FEDMOE_AUTH_TOKEN)"
)


class BearerAuthMiddleware(HttpMiddleware):
    """Puts the caller's ``Principal`` in ``scope["state"]``, or answers 401 at once."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        registry: TokenRegistry,
        revoked: Callable[[str], bool] = lambda _: False,
    ) -> None:
        super().__init__(app)
        self.registry = registry
        self.revoked = revoked  # worker ids removed with `fedmoe forget`

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate the request before its body is read."""
        principal = self._principal(scope)
        if principal is None:
            await _unauthorized(send)
            return
        if principal.worker_id is not None and self.revoked(principal.worker_id):
            detail = (
                f"worker {principal.worker_id!r} was removed (fedmoe forget); its token is revoked"
            )
            await _deny(send, 403, "worker_revoked", detail)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    def _principal(self, scope: Scope) -> Principal | None:
        if not self.registry.enabled:
            return ADMIN
        if scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            return Principal(role="anonymous")
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.registry.authenticate(token.strip())


async def _unauthorized(send: Send) -> None:
    realm = [(b"www-authenticate", b'Bearer realm="fedmoe"')]
    await _deny(send, 401, "unauthorized", UNAUTHORIZED_DETAIL, realm)


async def _deny(
    send: Send, status: int, code: str, detail: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"error": code, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                *(extra or []),
                (b"content-length", str(len(body)).encode()),
                # never read what an unauthenticated client declared: close instead
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
