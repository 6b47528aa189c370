"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Every answer names the adapter that generated it and the router's scores, in the
``X-FedMoE-Expert`` / ``X-FedMoE-Routing`` headers and in the body's ``fedmoe`` field
(in a stream: in every chunk).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from fedmoe.serve.engine import Delta, Failed, Finished, Sampling
from fedmoe.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    RoutingInfo,
    SamplingFields,
)
from fedmoe.serve.service import Generation, InvalidRequestError, Service
from fedmoe.serve.settings import AUTO_MODEL
from fedmoe.serve.streaming import ChunkKind, ChunkStream, new_id, usage_of

router = APIRouter(prefix="/v1", tags=["openai"])
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 422, 500)
}


def get_service(request: Request) -> Service:
    """The service this app serves."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


@router.get("/models", response_model=ModelList, responses=ERRORS)
def list_models(service: ServiceDep) -> ModelList:
    """Each expert, ``gateway`` (the merged adapter) and ``fedmoe-auto`` (routed)."""
    cards = [
        ModelCard(id=e.name, created=e.created, kind=e.kind, version=e.version, lora_rank=e.rank)
        for e in service.registry.entries().values()
    ]
    if AUTO_MODEL in service.model_names():
        created = min((c.created for c in cards), default=int(time.time()))
        cards.append(ModelCard(id=AUTO_MODEL, created=created, kind="router"))
    return ModelList(data=cards)


@router.post("/completions", response_model=Completion, responses=ERRORS)
async def create_completion(body: CompletionRequest, service: ServiceDep) -> Any:
    """A text completion of ``prompt`` (streamed as server-sent events with ``stream``)."""
    try:
        prompt = body.prompt_text()
    except ValueError as error:
        raise InvalidRequestError(str(error), param="prompt") from None

    def completion(text: str, finished: Finished, info: RoutingInfo) -> Completion:
        text = (prompt + text) if body.echo else text
        choice = CompletionChoice(text=text, finish_reason=finished.finish_reason)
        return Completion(
            id=new_id("cmpl"),
            created=int(time.time()),
            model=body.model,
            choices=[choice],
            usage=usage_of(finished),
            fedmoe=info,
        )

    sampling = _sampling(body, service)
    return await _answer(service, body, prompt, sampling, "text_completion", completion)


@router.post("/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def create_chat_completion(body: ChatRequest, service: ServiceDep) -> Any:
    """The assistant's next message, the tokenizer's chat template applied to ``messages``."""
    prompt = service.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])

    def chat_completion(text: str, finished: Finished, info: RoutingInfo) -> ChatCompletion:
        message = AssistantMessage(content=text)
        return ChatCompletion(
            id=new_id("chatcmpl"),
            created=int(time.time()),
            model=body.model,
            choices=[ChatChoice(message=message, finish_reason=finished.finish_reason)],
            usage=usage_of(finished),
            fedmoe=info,
        )

    sampling = _sampling(body, service, body.requested_max_tokens())
    return await _answer(service, body, prompt, sampling, "chat.completion.chunk", chat_completion)


async def _answer(
    service: Service,
    body: SamplingFields,
    prompt: str,
    sampling: Sampling,
    kind: ChunkKind,
    build: Callable[[str, Finished, RoutingInfo], BaseModel],
) -> Response:
    """Generate; stream ``kind`` chunks, or collect the text and answer with ``build``'s body."""
    generation = await service.start_generation(body.model, prompt, sampling)
    if body.stream:
        return _stream(generation, body, kind)
    text, finished = await _collect(generation)
    answer = build(text, finished, _info(generation, body.model, finished))
    return JSONResponse(answer.model_dump(), headers=_headers(generation))


def _sampling(body: SamplingFields, service: Service, max_tokens: int | None = None) -> Sampling:
    if body.n != 1:
        raise InvalidRequestError(
            f"n is {body.n}; this server generates one choice per request (n = 1)", param="n"
        )
    return Sampling(
        max_tokens=max_tokens or body.max_tokens or service.settings.default_max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_sequences(),
        seed=body.seed,
    )


async def _collect(generation: Generation) -> tuple[str, Finished]:
    parts = []
    async for event in generation.stream():
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Failed):
            raise RuntimeError(event.message)
        else:
            return "".join(parts), event
    raise RuntimeError("generation ended without an answer")


def _stream(generation: Generation, body: SamplingFields, kind: ChunkKind) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    stream = ChunkStream(
        kind, body.model, _info(generation, body.model, None), include_usage=include_usage
    )
    return StreamingResponse(
        stream.events(generation), media_type="text/event-stream", headers=_headers(generation)
    )


def _info(generation: Generation, model: str, finished: Finished | None) -> RoutingInfo:
    decision = generation.decision
    return RoutingInfo(
        model=model,
        expert=decision.adapter,
        version=generation.version,
        scores=decision.scores,
        fallback=decision.fallback,
        batch_size=finished.batch_size if finished else 1,
    )


def _headers(generation: Generation) -> dict[str, str]:
    decision = generation.decision
    scores = ",".join(f"{name}={score:.4f}" for name, score in decision.scores.items())
    headers = {
        "X-FedMoE-Expert": decision.adapter,
        "X-FedMoE-Expert-Version": str(generation.version),
    }
    if scores:
        headers["X-FedMoE-Routing"] = scores
    if decision.fallback:
        headers["X-FedMoE-Fallback"] = "true"
    return headers
