"""The generation engine: one thread owns the model and batches requests across adapters.

Requests arriving within ``batch_wait`` of each other (and sharing sampling settings)
go into one ``model.generate`` call whose rows each name their adapter (peft's per-row
``adapter_names``), so three requests for three experts cost about one forward per
token. Everything else that touches the model (loading a new expert version, routing
features) is queued as a call and runs between batches, so a reload never changes
weights under a request in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens for one request; temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Whether tokens are argmax picks."""
        return self.temperature == 0.0

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one ``generate`` call."""
        if self.greedy:
            return (True,)
        return (False, self.temperature, self.top_p, self.seed)


@dataclass(frozen=True)
class Delta:
    """New text of a request."""

    text: str


@dataclass(frozen=True)
class Finished:
    """A request is done: why, and its token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    batch_size: int


@dataclass(frozen=True)
class Failed:
    """Generation raised; the message says why."""

    message: str


Event = Delta | Finished | Failed


@dataclass
class GenerationJob:
    """One request: prompt token ids, the adapter to use, sampling, and where events go."""

    prompt_ids: list[int]
    adapter: str
    sampling: Sampling
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _CallJob:
    fn: Callable[[], Any]
    future: Future[Any]


class _Row:
    """Progress of one row of a batch: its tokens, text so far and what was sent."""

    def __init__(self, job: GenerationJob, tokenizer: Any) -> None:
        self.job, self.tokenizer = job, tokenizer
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.finish_reason: str | None = None
        # a stop string may straddle tokens: hold back what could be its beginning
        self.holdback = max((len(s) for s in job.sampling.stop), default=1) - 1

    def step(self, token: int, eos_ids: set[int]) -> None:
        """Take the row's next token; decide whether the row is done; emit new text."""
        if self.finish_reason is not None:
            return
        self.tokens.append(token)
        if token in eos_ids:
            self.finish_reason = "stop"
        else:
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            self._check_stop()
        if self.finish_reason is None and len(self.tokens) >= self.job.sampling.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is None and self.job.cancelled.is_set():
            self.finish_reason = "cancelled"
        self.flush()

    def _check_stop(self) -> None:
        found = [i for i in (self.text.find(s) for s in self.job.sampling.stop) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.finish_reason = "stop"

    def flush(self) -> None:
        """Emit the text that is safe to send: all of it once the row is done."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= self.holdback
            while end > self.sent and self.text[end - 1] == "\ufffd":  # an incomplete character
                end -= 1
        if end > self.sent:
            self.job.emit(Delta(self.text[self.sent : end]))
            self.sent = end


class _BatchMonitor(StoppingCriteria):  # type: ignore[misc]  # transformers is untyped
    """Called by ``generate`` after every step: feeds each row its token, says who is done."""

    def __init__(self, rows: Sequence[_Row], eos_ids: set[int]) -> None:
        self.rows, self.eos_ids = rows, eos_ids

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        """Per-row ``done`` flags, as transformers expects from a stopping criterion."""
        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last):
            row.step(int(token), self.eos_ids)
        done = [row.finish_reason is not None for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class Engine:
    """Owns the model on one thread; ``submit`` generation jobs, ``call`` anything else."""

    def __init__(
        self,
        model_getter: Callable[[], Any],
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        batch_wait: float = 0.005,
    ) -> None:
        self._model_getter, self.tokenizer = model_getter, tokenizer
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait
        self._queue: queue.Queue[GenerationJob | _CallJob | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="fedmoe-engine", daemon=True)
        self.batches_run = 0
        self._eos_ids = _eos_ids(tokenizer)
        self._thread.start()

    def submit(self, job: GenerationJob) -> None:
        """Queue a generation; its events go to ``job.emit`` from the engine thread."""
        self._queue.put(job)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the engine thread between batches; its result comes in the future."""
        future: Future[T] = Future()
        self._queue.put(_CallJob(fn, future))
        return future

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = self._collect(first)
            for job in [j for j in jobs if isinstance(j, _CallJob)]:
                _run_call(job)
            generations = [j for j in jobs if isinstance(j, GenerationJob)]
            for group in _group(generations):
                self._generate(group)
            if None in jobs:
                return

    def _collect(self, first: GenerationJob | _CallJob) -> list[Any]:
        """The first job and whatever else arrives within ``batch_wait`` (up to the batch size)."""
        jobs: list[Any] = [first]
        if not isinstance(first, GenerationJob):
            return jobs
        deadline = time.monotonic() + self.batch_wait
        while sum(isinstance(j, GenerationJob) for j in jobs) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            jobs.append(job)
            if job is None:
                break
        return jobs

    @torch.inference_mode()
    def _generate(self, jobs: list[GenerationJob]) -> None:
        known = {"__base__", *self._model_getter().peft_config}
        for job in [j for j in jobs if j.adapter not in known]:
            # e.g. a router mix replaced by a newer expert version after routing: rare
            job.emit(Failed(f"adapter {job.adapter} is no longer loaded; retry the request"))
        rows = [_Row(job, self.tokenizer) for job in jobs if job.adapter in known]
        if not rows:
            return
        try:
            self._generate_rows(rows)
        except Exception as error:  # one bad batch must not kill the engine thread
            logger.exception("generation failed for a batch of %d", len(rows))
            for row in rows:
                row.job.emit(Failed(f"generation failed: {error}"))
            return
        self.batches_run += 1
        for row in rows:
            row.finish_reason = row.finish_reason or "length"
            row.flush()
            row.job.emit(
                Finished(row.finish_reason, len(row.job.prompt_ids), len(row.tokens), len(rows))
            )

    def _generate_rows(self, rows: list[_Row]) -> None:
        model = self._model_getter()
        device = next(model.parameters()).device
        input_ids, attention_mask = left_pad(
            [row.job.prompt_ids for row in rows], self.tokenizer.pad_token_id
        )
        sampling = rows[0].job.sampling
        options: dict[str, Any] = {"do_sample": not sampling.greedy}
        if sampling.greedy:
            options.update(temperature=None, top_p=None, top_k=None)
        else:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            adapter_names=[row.job.adapter for row in rows],
            max_new_tokens=max(row.job.sampling.max_tokens for row in rows),
            stopping_criteria=StoppingCriteriaList([_BatchMonitor(rows, self._eos_ids)]),
            pad_token_id=self.tokenizer.pad_token_id,
            **options,
        )


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left (a decoder continues each at the end) and their mask.

    Done by hand rather than ``tokenizer.pad`` so the engine never changes tokenizer
    state that request handlers read concurrently.
    """
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for index, ids in enumerate(prompts):
        input_ids[index, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[index, width - len(ids) :] = 1
    return input_ids, mask


def _run_call(job: _CallJob) -> None:
    if not job.future.set_running_or_notify_cancel():
        return
    try:
        job.future.set_result(job.fn())
    except BaseException as error:
        job.future.set_exception(error)


def _group(jobs: list[GenerationJob]) -> list[list[GenerationJob]]:
    """Jobs split by sampling settings, in arrival order; cancelled ones dropped."""
    groups: dict[tuple[Any, ...], list[GenerationJob]] = {}
    for job in jobs:
        if not job.cancelled.is_set():
            groups.setdefault(job.sampling.batch_key(), []).append(job)
    return list(groups.values())


def _eos_ids(tokenizer: Any) -> set[int]:
    """Token ids that end a generation: EOS, and the chat template's end-of-turn if any."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return ids
