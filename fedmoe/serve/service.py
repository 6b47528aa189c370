"""The serving service: base model, adapters, engine, router and reloader, put together.

The API layer calls ``Service.start_generation`` and reads events; it never touches
the model. Errors are the domain errors below; only ``fedmoe.serve.app`` maps them to
HTTP statuses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from fedmoe.client import CoordinatorClient
from fedmoe.modeling import load_base_model
from fedmoe.serve.engine import Engine, Event, Failed, Finished, GenerationJob, Sampling
from fedmoe.serve.models import ModelRegistry
from fedmoe.serve.settings import AUTO_MODEL, GATEWAY_MODEL, ServeSettings
from fedmoe.serve.sources import CoordinatorSource, DirectorySource

logger = logging.getLogger(__name__)


class ServeError(Exception):
    """A request this server cannot answer; ``param`` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class UnknownModelError(ServeError):
    """The request names a model that is not served."""


class InvalidRequestError(ServeError):
    """A well-formed request asks for something out of bounds."""


@dataclass(frozen=True)
class RoutingDecision:
    """The adapter a request goes to, with the router's scores when it was routed."""

    adapter: str
    scores: dict[str, float] = field(default_factory=dict)
    fallback: bool = False


class RequestRouter(Protocol):
    """Picks an adapter for each text; runs on the engine thread (it may use the model)."""

    def route(self, texts: list[str]) -> list[RoutingDecision]:
        """One decision per text."""
        ...


@dataclass
class Generation:
    """A started generation: where it goes, and its events as they come."""

    decision: RoutingDecision
    version: int
    job: GenerationJob
    events: asyncio.Queue[Event]

    async def stream(self) -> AsyncIterator[Event]:
        """Events until ``Finished`` or ``Failed`` (inclusive)."""
        while True:
            event = await self.events.get()
            yield event
            if isinstance(event, Finished | Failed):
                return


class Service:
    """Everything ``fedmoe serve`` runs; build with ``Service.open``."""

    def __init__(
        self,
        settings: ServeSettings,
        registry: ModelRegistry,
        source: CoordinatorSource | None = None,
    ) -> None:
        self.settings, self.registry, self.source = settings, registry, source
        self.engine = Engine(
            registry.require_model,
            registry.tokenizer,
            max_batch_size=settings.max_batch_size,
            batch_wait=settings.batch_wait_ms / 1000,
        )
        self.router: RequestRouter | None = None
        # the serving side's choices over the coordinator's router settings
        self.router_options: dict[str, Any] = (
            {"fallback": settings.router_fallback} if settings.router_fallback else {}
        )
        self.context_length = int(getattr(registry.base.model.config, "max_position_embeddings", 0))

    @classmethod
    def open(cls, settings: ServeSettings) -> Service:
        """Load the base model and every adapter from the configured source."""
        if settings.adapters_dir is not None:
            directories = DirectorySource(settings.adapters_dir)
            base = load_base_model(
                settings.base_model or directories.base_model, device=settings.device
            )
            registry = ModelRegistry(base)
            service = cls(settings, registry)
            for name, path in directories.directories.items():
                if name == GATEWAY_MODEL and not settings.gateway:
                    continue
                service.run_on_engine(partial(registry.install_dir, name, path))
            service.set_router(_dir_router(settings.adapters_dir, service.router_options))
            return service
        client = CoordinatorClient(
            settings.coordinator_url or "",
            token=settings.coordinator_secret(),
            ca_cert=settings.ca_cert,
        )
        source = CoordinatorSource(client, gateway=settings.gateway)
        base = load_base_model(settings.base_model or source.base_model, device=settings.device)
        if base.fingerprint != source.fingerprint:
            raise ValueError(
                f"base model {base.name} ({base.fingerprint}) is not the coordinator's "
                f"({source.fingerprint})"
            )
        service = cls(settings, ModelRegistry(base), source)
        service.reload()
        return service

    def run_on_engine(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread and wait for it (startup and reloads)."""
        return self.engine.call(fn).result()

    def set_router(self, router: Any) -> None:
        """Serve ``fedmoe-auto`` with ``router`` (a ``fedmoe.routing.Router``; None: fallback)."""
        from fedmoe.serve.router import ServeRouter

        self.router = ServeRouter(router, self.registry) if router is not None else None

    def reload(self) -> list[str]:
        """Install every adapter whose version changed on the coordinator, refresh the router.

        Returns the names and versions installed.
        """
        if self.source is None:
            return []
        from fedmoe.serve.router import router_from_coordinator

        changed = []
        for adapter in self.source.changed():
            install = partial(
                self.registry.install,
                adapter.name,
                adapter.config,
                adapter.state,
                version=adapter.version,
                etag=adapter.etag,
            )
            self.run_on_engine(install)
            self.source.installed(adapter)
            changed.append(f"{adapter.name} v{adapter.version}")
        if changed:
            logger.info("reloaded %s", ", ".join(changed))
        self.set_router(router_from_coordinator(self.source.client, **self.router_options))
        return changed

    async def reload_forever(self) -> None:
        """Poll the coordinator every ``reload_interval`` seconds; errors are logged, not fatal."""
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            try:
                await asyncio.to_thread(self.reload)
            except Exception as error:  # a coordinator down or restarting: try again later
                logger.warning("reload from the coordinator failed: %s", error)

    def model_names(self) -> list[str]:
        """Every model a request may name."""
        names = list(self.registry.entries())
        return [*names, AUTO_MODEL] if self.router is not None or names else names

    async def decide(self, model: str, text: str) -> RoutingDecision:
        """The adapter ``model`` means for ``text``; UnknownModelError if none."""
        entries = self.registry.entries()
        if model in entries:
            return RoutingDecision(model)
        if model != AUTO_MODEL:
            raise UnknownModelError(
                f"The model '{model}' does not exist; choose one of {self.model_names()}",
                param="model",
                code="model_not_found",
            )
        if self.router is None:
            fallback = GATEWAY_MODEL if GATEWAY_MODEL in entries else next(iter(entries))
            return RoutingDecision(fallback, fallback=True)
        router = self.router
        decisions = await asyncio.wrap_future(self.engine.call(lambda: router.route([text])))
        return decisions[0]

    async def start_generation(self, model: str, prompt: str, sampling: Sampling) -> Generation:
        """Route, tokenize, check bounds, and queue a generation."""
        if sampling.max_tokens > self.settings.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens is {sampling.max_tokens}; this server allows at most "
                f"{self.settings.max_tokens_limit}",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        decision = await self.decide(model, prompt)
        prompt_ids = self.registry.tokenizer(prompt)["input_ids"]
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if self.context_length and len(prompt_ids) + sampling.max_tokens > self.context_length:
            raise InvalidRequestError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({sampling.max_tokens}) "
                f"exceeds the model's context length {self.context_length}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = GenerationJob(prompt_ids, decision.adapter, sampling, emit)
        version = self.registry.entry(decision.adapter).version
        self.engine.submit(job)
        return Generation(decision, version, job, events)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The chat template applied to ``messages``, ready for the assistant's turn."""
        tokenizer = self.registry.tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return str(text)
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant: "])

    def close(self) -> None:
        """Stop the engine and the coordinator client."""
        self.engine.close()
        if self.source is not None:
            self.source.client.close()


def _dir_router(root: Any, options: dict[str, Any]) -> Any:
    from fedmoe.serve.router import router_from_dir

    return router_from_dir(root, **options)
