"""Limits on what a client can make the server hold or wait for.

``BodyGuardMiddleware`` (ASGI) gives every request a body limit that fits its route,
checked on ``Content-Length`` before anything is read and counted while a chunked body
streams (413), cuts off a body that stalls (408), and closes the connection after any
answer sent before the body was read, so that a refused client cannot make the server
read (and discard) what it declared. ``header_timeout_protocol`` is uvicorn's h11
protocol with a deadline on the request head, which no ASGI layer can see (slowloris).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedmoe.api.asgi import HttpMiddleware

logger = logging.getLogger(__name__)

CLOSE = {"Connection": "close"}


class BodyGuardMiddleware(HttpMiddleware):
    """Per-route body limits (413), a stalled-body timeout (408) and close-after-refusal."""

    def __init__(
        self, app: ASGIApp, *, limit_for: Callable[[Scope], int], body_timeout: Callable[[], float]
    ) -> None:
        super().__init__(app)
        self.limit_for = limit_for
        self.body_timeout = body_timeout

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a declared oversized body at once; otherwise guard reads and answers."""
        limit = self.limit_for(scope)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            detail = f"body of {declared.decode('latin-1')} bytes exceeds the {limit}-byte limit"
            await _refuse(send, 413, "payload_too_large", detail)
            return
        has_body = declared not in (None, b"0") or b"transfer-encoding" in headers
        guard = _Guard(limit, self.body_timeout(), done=not has_body, receive=receive)
        await self.app(scope, guard.receive, guard.wrap_send(send))


class _Guard:
    """The state of one request's body: bytes seen, and whether it has all arrived."""

    def __init__(self, limit: int, timeout: float, *, done: bool, receive: Receive) -> None:
        self.limit, self.timeout, self.done = limit, timeout, done
        self.size = 0
        self._receive = receive

    async def receive(self) -> Message:
        if self.done:
            return await self._receive()
        try:
            message = await _receive_within(self._receive, self.timeout)
        except TimeoutError:
            detail = f"the request body stalled: nothing arrived for {self.timeout:g}s"
            raise HTTPException(408, detail=detail, headers=CLOSE) from None
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.limit:
                detail = f"body exceeds the {self.limit}-byte limit"
                raise HTTPException(413, detail=detail, headers=CLOSE)
            self.done = not message.get("more_body", False)
        return message

    def wrap_send(self, send: Send) -> Send:
        async def guarded(message: Message) -> None:
            if message["type"] == "http.response.start" and not self.done:
                # Answered before the body was read: closing is the only way not to read it.
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        return guarded


if sys.version_info >= (3, 11):

    async def _receive_within(receive: Receive, seconds: float) -> Message:
        """``receive()``, or TimeoutError after ``seconds``. ``asyncio.timeout`` arms a timer;
        ``wait_for`` also wraps each call in a new task, 20 µs more per body chunk here."""
        async with asyncio.timeout(seconds):
            return await receive()

else:  # pragma: no cover - Python 3.10

    async def _receive_within(receive: Receive, seconds: float) -> Message:
        """``receive()``, or TimeoutError after ``seconds`` (asyncio's own before 3.11)."""
        try:
            return await asyncio.wait_for(receive(), seconds)
        except asyncio.TimeoutError:
            raise TimeoutError from None


async def _refuse(send: Send, status: int, code: str, detail: str) -> None:
    body = json.dumps({"error": code, "detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head takes over ``timeout``."""

    class HeaderTimeoutProtocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            inner = self.app

            async def app(scope: Scope, receive: Receive, send: Send) -> None:
                self._disarm()  # the head is complete: the app runs
                await inner(scope, receive, send)

            self.app = app

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(timeout, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                logger.info("closing %s: no complete request head in %gs", self.client, timeout)
                self.transport.close()

    return HeaderTimeoutProtocol
