"""The worker job: setup, continuous local training, periodic sync, final upload.

Sync protocol: the worker uploads Δ = local − pulled with the version it pulled,
then pulls the expert's newest version and *rebases* onto it, keeping the
training it did while the upload was in flight (local ← new + (local − snapshot)).
An upload that never reached the coordinator (connection refused) is dropped and
re-made, bigger, next time; an upload whose fate is unknown is retried with the
same update id, which the coordinator applies at most once.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import httpx
import torch

from fedmoe.adapters import encode_adapter
from fedmoe.aggregate import AdapterState, apply_update
from fedmoe.batching import tokenize_examples, tokenize_training_set
from fedmoe.client import ApiError, CoordinatorClient
from fedmoe.config import LoraSettings
from fedmoe.data import load_examples, split_examples
from fedmoe.evaluation import validation_loss
from fedmoe.modeling import (
    adapter_state,
    attach_lora,
    load_adapter_state,
    load_base_model,
    resolve_device,
)
from fedmoe.worker.options import WorkerOptions
from fedmoe.worker.progress import PendingUpdate, WorkerStats
from fedmoe.worker.signing import share_signature
from fedmoe.worker.trainer import LocalTrainer

logger = logging.getLogger(__name__)


class FatalSyncError(RuntimeError):
    """The coordinator refused us in a way retrying cannot fix (auth, incompatibility)."""


class WorkerJob:
    """One worker process: ``run()`` = setup, train until told to stop, cleanup."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.stop_event = threading.Event()
        self.stats = WorkerStats()
        self.pending: PendingUpdate | None = None
        self.unrebased: AdapterState | None = None
        self.backoff = 1.0
        self.next_sync_at = 0.0
        self.run_id: str | None = None
        self.summary: dict[str, Any] = {}

    # --- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Validate data, connect, load the model, register and pull the expert."""
        opts = self.options
        examples = load_examples(opts.dataset)  # a bad line stops us before anything else
        eval_examples = load_examples(opts.eval_dataset) if opts.eval_dataset else None
        if eval_examples is None and opts.validation_fraction > 0:
            examples, eval_examples = split_examples(
                examples, validation_fraction=opts.validation_fraction
            )
        self.client = CoordinatorClient(
            opts.coordinator_url, token=opts.auth_token, ca_cert=opts.ca_cert
        )
        self.schema = self._wait_for(self.client.schema)
        self.lora = LoraSettings.from_dict(self.schema["lora_config"])
        self.tensor_shapes = {k: tuple(v) for k, v in self.schema["tensors"].items()}
        self.device = resolve_device(opts.device)
        base_name = opts.base_model or self.schema["base_model"]
        base = load_base_model(base_name, device=opts.device)
        self.fingerprint, self.tokenizer = base.fingerprint, base.tokenizer
        self.model = attach_lora(base.model, self.lora)
        self.pad_id = self.tokenizer.pad_token_id
        max_length = opts.train.max_length
        self.train_set = tokenize_training_set(
            examples, self.tokenizer, max_length=max_length, source=opts.dataset
        )
        self.eval_set = (
            tokenize_examples(eval_examples, self.tokenizer, max_length=max_length)
            if eval_examples
            else []
        )
        self.trainer = LocalTrainer(
            self.model,
            self.train_set,
            opts.train,
            pad_token_id=self.pad_id,
            device=self.device,
            learning_rate=opts.train.learning_rate_for(base_name),
        )
        self._wait_for(self._register)
        self._wait_for(self._pull_and_reset)
        self._wait_for(
            lambda: share_signature(
                self.client,
                worker_id=opts.worker_id,
                specialty=opts.specialty,
                model=self.model,
                tokenizer=self.tokenizer,
                fingerprint=self.fingerprint,
                examples=examples,
                noise=opts.signature_noise,
            )
        )
        logger.info(
            "%s: %d training and %d validation examples, expert %s v%d on %s",
            opts.worker_id,
            len(self.train_set),
            len(self.eval_set),
            opts.specialty,
            self.base_version,
            self.device,
        )

    def _wait_for(self, call: Any) -> Any:
        """Retry ``call`` with backoff while the coordinator is unreachable or answers 5xx."""
        delay = 1.0
        while True:
            try:
                return call()
            except (httpx.TransportError, ApiError) as error:
                refused = isinstance(error, ApiError) and not error.transient
                if refused or self.stop_event.is_set():
                    raise
                logger.warning("coordinator unavailable (%s); retrying in %.0fs", error, delay)
                self.stop_event.wait(delay)
                delay = min(delay * 2, self.options.max_backoff)

    def _register(self) -> None:
        try:
            answer = self.client.register(
                worker_id=self.options.worker_id,
                specialty=self.options.specialty,
                fingerprint=self.fingerprint,
                lora_config=self.lora.to_dict(),
            )
        except ApiError as error:
            if error.transient:
                raise  # not a refusal: retried
            raise FatalSyncError(f"registration refused: {error}") from None
        if self.run_id is not None and answer["run_id"] != self.run_id:
            logger.warning(
                "coordinator state was replaced (run %s -> %s); re-pulling",
                self.run_id,
                answer["run_id"],
            )
            self.pending = None
            self._pull_and_rebase(since=self.pulled)
        self.run_id = answer["run_id"]

    def _pull(self) -> tuple[int, AdapterState]:
        return self.client.expert_adapter(self.options.specialty, self.tensor_shapes)

    def _pull_and_reset(self) -> None:
        self.base_version, self.pulled = self._pull()
        load_adapter_state(self.model, self.pulled)

    def _pull_and_rebase(self, since: AdapterState) -> None:
        """Move onto the newest expert, keeping what was trained after ``since``."""
        version, newest = self._pull()
        local = adapter_state(self.model)
        progress = {key: local[key] - since[key] for key in local}
        load_adapter_state(self.model, apply_update(newest, progress, 1.0))
        self.base_version, self.pulled = version, newest

    # --- training --------------------------------------------------------------------------

    def train(self) -> None:
        """Train until stopped (signal, ``max_steps`` or ``max_seconds``), syncing on schedule."""
        # Time limits and rates count training only, not model loading and registration.
        self.stats.started = time.monotonic()
        self.stats.reset_window()
        self.next_sync_at = time.monotonic() + self.options.sync_interval
        while not self._should_stop():
            began = time.monotonic()
            result = self.trainer.step()
            if self.options.slowdown > 1.0:
                self.stop_event.wait((self.options.slowdown - 1.0) * (time.monotonic() - began))
            if result.skipped:
                self.stats.skipped_steps += 1
                continue
            self.stats.steps += 1
            self.stats.tokens += result.tokens
            self.stats.window_tokens += result.tokens
            self.stats.window_losses.append(result.loss)
            if time.monotonic() >= self.next_sync_at:
                self.sync()

    def _should_stop(self) -> bool:
        opts = self.options
        if opts.max_steps is not None and self.stats.steps >= opts.max_steps:
            return True
        elapsed = time.monotonic() - self.stats.started
        if opts.max_seconds is not None and elapsed >= opts.max_seconds:
            return True
        return self.stop_event.is_set()

    def sync(self) -> bool:
        """Upload the delta and rebase onto the newest expert; False if it must be retried."""
        began = time.monotonic()
        try:
            self._sync_once()
        except httpx.ConnectError as error:
            if self.pending is not None and not self.pending.maybe_delivered:
                self.pending = None  # it never arrived: next time we send the bigger delta
            self._schedule_retry(f"coordinator unreachable ({error})")
            return False
        except httpx.TransportError as error:
            if self.pending is not None:
                self.pending.maybe_delivered = True
            self._schedule_retry(f"upload's fate unknown ({error!r}); will resend the same id")
            return False
        except ApiError as error:
            if error.status_code in (401, 403):
                raise FatalSyncError(f"coordinator refused us: {error}") from None
            self._schedule_retry(f"coordinator error ({error})")
            return False
        finally:
            self.stats.blocked_seconds += time.monotonic() - began
        self.backoff = 1.0
        self.next_sync_at = time.monotonic() + self.options.sync_interval
        return True

    def _schedule_retry(self, reason: str) -> None:
        self.stats.failed_syncs += 1
        logger.warning("%s; retrying in %.0fs", reason, self.backoff)
        self.next_sync_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, self.options.max_backoff)

    def _sync_once(self) -> None:
        if self.unrebased is not None:  # an acknowledged upload whose pull failed
            self._pull_and_rebase(since=self.unrebased)
            self.unrebased = None
            return
        if self.pending is None:
            self.pending = self._make_pending()
        pending = self.pending
        try:
            ack = self.client.upload(
                self.options.specialty,
                pending.body,
                worker_id=self.options.worker_id,
                update_id=pending.update_id,
                base_version=pending.base_version,
                num_tokens=pending.tokens,
                train_loss=pending.train_loss,
            )
        except ApiError as error:
            if error.transient:
                raise  # not a refusal: sync() retries the same update id later
            self._handle_refusal(error, pending)
            return
        self.pending, self.unrebased = None, pending.snapshot
        self.stats.settle(pending)
        self._report(ack, pending)
        self._pull_and_rebase(since=pending.snapshot)
        self.unrebased = None

    def _make_pending(self) -> PendingUpdate:
        snapshot = adapter_state(self.model)
        delta = {key: snapshot[key] - self.pulled[key] for key in snapshot}
        dtype = getattr(torch, self.options.upload_dtype)
        pending = PendingUpdate(
            update_id=f"{self.options.worker_id}:{uuid.uuid4().hex}",
            body=encode_adapter(delta, dtype=dtype),
            base_version=self.base_version,
            tokens=self.stats.window_tokens,
            loss_count=len(self.stats.window_losses),
            train_loss=self.stats.window_loss(),
            snapshot=snapshot,
        )
        return pending

    def _handle_refusal(self, error: ApiError, pending: PendingUpdate) -> None:
        if error.code == "unknown_worker":
            logger.warning("coordinator does not know us (restarted?); registering again")
            self._register()
            return  # self.pending is kept (or cleared by a state change); retried next sync
        if error.status_code in (401, 403) or error.code == "incompatible_worker":
            raise FatalSyncError(f"coordinator refused {self.options.worker_id}: {error}")
        logger.warning(
            "update %s refused (%s); dropping it and moving to the newest expert",
            pending.update_id,
            error,
        )
        self.pending = None
        self.stats.settle(pending)
        self._pull_and_rebase(since=pending.snapshot)

    def _report(self, ack: dict[str, Any], pending: PendingUpdate) -> None:
        stats = self.stats
        stats.uploads += 1
        stats.last_staleness, stats.last_version = ack["staleness"], ack["version"]
        elapsed = max(time.monotonic() - stats.started, 1e-9)
        loss = "n/a" if pending.train_loss is None else f"{pending.train_loss:.4f}"
        logger.info(
            "%s sync %d: loss %s, %.0f tok/s, %s v%d (staleness %d, weight %.3f), gateway v%d",
            self.options.worker_id,
            stats.uploads,
            loss,
            stats.tokens / elapsed,
            self.options.specialty,
            ack["version"],
            ack["staleness"],
            ack["weight"],
            ack["gateway_version"],
        )

    # --- cleanup ---------------------------------------------------------------------------

    def cleanup(self, *, final_attempts: int = 5) -> dict[str, Any]:
        """Upload what is left (bounded retries), evaluate, and close the client."""
        if hasattr(self, "trainer") and self.stats.steps > 0:
            for _ in range(final_attempts):
                if not self.stats.window_tokens and self.pending is None and self.unrebased is None:
                    break
                try:
                    if self.sync():
                        continue
                except FatalSyncError as error:
                    logger.error("final upload impossible: %s", error)
                    break
                time.sleep(min(self.backoff, 5.0))
        self.summary = self._summary()
        logger.info("%s finished: %s", self.options.worker_id, self.summary)
        if hasattr(self, "client"):
            self.client.close()
        return self.summary

    def _summary(self) -> dict[str, Any]:
        stats = self.stats
        elapsed = max(time.monotonic() - stats.started, 1e-9)
        summary: dict[str, Any] = {
            "worker_id": self.options.worker_id,
            "steps": stats.steps,
            "skipped_steps": stats.skipped_steps,
            "tokens": stats.tokens,
            "seconds": round(elapsed, 3),
            "tokens_per_second": stats.tokens / elapsed,
            "uploads": stats.uploads,
            "failed_syncs": stats.failed_syncs,
            "blocked_share": stats.blocked_seconds / elapsed,
            "expert_version": getattr(self, "base_version", None),
            "unsent_tokens": stats.window_tokens,
        }
        if getattr(self, "eval_set", None):
            summary["validation_loss"] = validation_loss(
                self.model, self.eval_set, pad_token_id=self.pad_id
            )
        return summary

    def run(self) -> dict[str, Any]:
        """setup → train → cleanup; returns the summary."""
        self.setup()
        try:
            self.train()
        finally:
            summary = self.cleanup()
        return summary

    def request_stop(self) -> None:
        """Ask the training loop to stop after the current step (signal-safe)."""
        self.stop_event.set()
