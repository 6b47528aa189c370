"""OpenAI-compatible request and response bodies (the subset ``fedmoe serve`` implements).

Unknown request fields are ignored, as OpenAI's clients send options this server does
not implement (``user``, ``logit_bias``, ...); known fields are validated strictly and a
bad one is a 422 naming it.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4
ChoiceT = TypeVar("ChoiceT", bound=BaseModel)


class RoutingInfo(BaseModel):
    """Which adapter served a request and why (the ``fedmoe`` field of every answer)."""

    model: str = Field(description="The model the request asked for.")
    expert: str = Field(description="The adapter that generated: an expert or 'gateway'.")
    version: int = Field(description="That adapter's version.")
    scores: dict[str, float] = Field(
        default_factory=dict, description="Router scores per expert (fedmoe-auto only)."
    )
    fallback: bool = Field(False, description="The router found no clear winner.")
    batch_size: int = Field(1, description="Requests generated together in one batch.")


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` is honoured."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        values = [stop] if isinstance(stop, str) else (stop or [])
        if len(values) > MAX_STOP_SEQUENCES or any(not value for value in values):
            raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings")
        return stop

    def stop_sequences(self) -> tuple[str, ...]:
        """``stop`` as a tuple of strings."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    echo: bool = False

    def prompt_text(self) -> str:
        """The one prompt (a list must hold exactly one string)."""
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("prompt: this server takes one prompt per request")
        return self.prompt[0]


class TextPart(BaseModel):
    """One ``{"type": "text", "text": ...}`` part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; content parts other than text are refused."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    """Token counts."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    """One completion."""

    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionEnvelope(BaseModel, Generic[ChoiceT]):
    """What a text and a chat completion have in common:
    OpenAI's fields, then FedMoE's routing."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChoiceT]
    usage: Usage | None = None
    fedmoe: RoutingInfo


class Completion(CompletionEnvelope[CompletionChoice]):
    """A text completion (``object: text_completion``)."""

    object: Literal["text_completion"] = "text_completion"


class AssistantMessage(BaseModel):
    """The generated chat message (or, in a stream, its delta)."""

    role: Literal["assistant"] | None = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    """One chat completion."""

    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletion(CompletionEnvelope[ChatChoice]):
    """A chat completion (``object: chat.completion``)."""

    object: Literal["chat.completion"] = "chat.completion"
    usage: Usage


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fedmoe"
    kind: Literal["expert", "gateway", "router"]
    version: int | None = None
    lora_rank: int | None = None


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


def chunk(
    kind: Literal["text_completion", "chat.completion.chunk"],
    request_id: str,
    created: int,
    model: str,
    choice: dict[str, Any] | None,
    **extra: Any,
) -> dict[str, Any]:
    """One server-sent event's JSON in OpenAI's streaming format."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice] if choice is not None else [],
    }
    body.update(extra)
    return body
