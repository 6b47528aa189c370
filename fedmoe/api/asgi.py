"""The base of the API's pure ASGI middlewares (body guard, authentication, metrics)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class HttpMiddleware:
    """Handles ``http`` scopes in ``http()``; passes every other scope (lifespan) straight on.

    Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``, so that a subclass sees the
    request before its body is read and can refuse it without reading it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Hand HTTP requests to ``http()``; anything else goes to the app unchanged."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one HTTP request (by default: pass it on)."""
        await self.app(scope, receive, send)
