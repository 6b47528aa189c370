"""Server-sent events in OpenAI's streaming format (``stream: true``).

Each event is ``data: <json chunk>``; the stream ends with ``data: [DONE]``. Chat chunks
carry a ``delta`` (the first one the role), completion chunks ``text``; the last content
chunk has the ``finish_reason``, and with ``stream_options.include_usage`` one more chunk
with no choices carries ``usage``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fedmoe.serve.engine import Delta, Failed, Finished
from fedmoe.serve.schemas import RoutingInfo, Usage, chunk
from fedmoe.serve.service import Generation

ChunkKind = Literal["text_completion", "chat.completion.chunk"]


def new_id(prefix: str) -> str:
    """An OpenAI-looking response id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_of(finished: Finished) -> Usage:
    """Token counts of a finished generation."""
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
    )


class ChunkStream:
    """Turns a generation's events into SSE lines for one request."""

    def __init__(
        self, kind: ChunkKind, model: str, info: RoutingInfo, *, include_usage: bool
    ) -> None:
        self.kind, self.model, self.include_usage = kind, model, include_usage
        self.info = info.model_dump()
        self.id = new_id("cmpl" if kind == "text_completion" else "chatcmpl")
        self.created = int(time.time())

    def _choice(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.kind == "text_completion":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _frame(self, choice: dict[str, Any] | None, **extra: Any) -> str:
        body = chunk(self.kind, self.id, self.created, self.model, choice, **extra)
        return f"data: {json.dumps(body)}\n\n"

    def _finish(self, event: Finished) -> list[str]:
        self.info["batch_size"] = event.batch_size
        frames = [self._frame(self._choice(None, event.finish_reason), fedmoe=self.info)]
        if self.include_usage:
            frames.append(self._frame(None, usage=usage_of(event).model_dump()))
        return frames

    async def events(self, generation: Generation) -> AsyncIterator[str]:
        """Every SSE line of the answer, ``data: [DONE]`` last."""
        if self.kind != "text_completion":
            yield self._frame(self._choice("", None, first=True), fedmoe=self.info)
        try:
            async for event in generation.stream():
                if isinstance(event, Delta):
                    yield self._frame(self._choice(event.text, None), fedmoe=self.info)
                elif isinstance(event, Failed):
                    error = {"message": event.message, "type": "server_error", "param": None}
                    yield f"data: {json.dumps({'error': {**error, 'code': None}})}\n\n"
                else:
                    for frame in self._finish(event):
                        yield frame
            yield "data: [DONE]\n\n"
        finally:
            generation.job.cancelled.set()  # the client may have left: stop generating for it
