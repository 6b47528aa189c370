"""The worker job: setup (data, model, registration), continuous local training, cleanup.

The sync protocol itself (upload Δ, rebase, retries) is ``fedmoe.worker.sync.Syncer``;
this module wires it to a real model. The coordinator client and the clock are
constructor parameters so that tests can drive a job without sockets or real time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Protocol

import torch
from peft import PeftModel

from fedmoe.adapters import AdapterSchema
from fedmoe.batching import TokenizedExample, tokenize_examples, tokenize_training_set
from fedmoe.client import CoordinatorClient
from fedmoe.config import LoraSettings
from fedmoe.data import Example, load_examples, split_examples
from fedmoe.evaluation import validation_loss
from fedmoe.modeling import (
    attach_lora,
    load_base_model,
    resolve_device,
)
from fedmoe.schemas import SchemaInfo
from fedmoe.worker.fed_eval import EvaluationClient, FederatedEvaluator
from fedmoe.worker.fed_routed import RoutedEvaluation
from fedmoe.worker.options import WorkerOptions
from fedmoe.worker.peft_slot import PeftAdapterSlot
from fedmoe.worker.privacy import PrivateTrainer, build_trainer
from fedmoe.worker.progress import WorkerStats
from fedmoe.worker.signing import SignatureClient, share_signature
from fedmoe.worker.sync import Syncer
from fedmoe.worker.sync_seams import (
    Clock,
    FatalSyncError,
    SyncClient,
    SyncIdentity,
    SystemClock,
    wait_for,
)
from fedmoe.worker.trainer import LocalTrainer

__all__ = ["FatalSyncError", "PeftAdapterSlot", "WorkerJob"]

logger = logging.getLogger(__name__)


class WorkerClient(SyncClient, EvaluationClient, SignatureClient, Protocol):
    """What a worker job uses of ``CoordinatorClient``: sync, evaluation, its signature."""


class WorkerJob:
    """One worker process: ``run()`` = setup, train until told to stop, cleanup."""

    def __init__(
        self,
        options: WorkerOptions,
        *,
        client: WorkerClient | None = None,
        clock: Clock | None = None,
        examples: list[Example] | None = None,
    ) -> None:
        """``examples``: ``options.dataset`` already loaded (the CLI checks it first)."""
        self.options = options
        self.client: WorkerClient = client or CoordinatorClient(
            options.coordinator_url, token=options.auth_token, ca_cert=options.ca_cert
        )
        self.clock: Clock = clock or SystemClock()
        self.stop_event = threading.Event()
        self.stats = WorkerStats(started=self.clock.now())  # train() restarts it
        self.summary: dict[str, Any] = {}
        # load_data()
        self._loaded = examples
        self.examples: list[Example] = []
        self.eval_examples: list[Example] = []
        # load_model()
        self.schema: SchemaInfo | None = None
        self.lora: LoraSettings | None = None
        self.tensor_shapes: AdapterSchema = {}
        self.device = torch.device("cpu")
        self.fingerprint = ""
        self.tokenizer: Any = None  # a transformers tokenizer (or the tiny preset's)
        self.model: PeftModel | None = None
        self.pad_id = 0
        self.train_set: list[TokenizedExample] = []
        self.eval_set: list[TokenizedExample] = []
        self.trainer: LocalTrainer | None = None
        # register()
        self.syncer: Syncer | None = None
        self.fed_eval: FederatedEvaluator | None = None  # once the model is set up

    # --- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Validate the data, load the model, register and pull the expert."""
        self.load_data()
        self.load_model()
        self.register()

    def load_data(self) -> None:
        """Read (and split) the datasets: a bad line stops us before anything else."""
        opts = self.options
        self.examples = self._loaded if self._loaded is not None else load_examples(opts.dataset)
        if opts.eval_dataset:
            self.eval_examples = load_examples(opts.eval_dataset)
        elif opts.validation_fraction > 0:
            self.examples, self.eval_examples = split_examples(
                self.examples, validation_fraction=opts.validation_fraction
            )

    def _wait_for(self, call: Any) -> Any:
        return wait_for(
            call, clock=self.clock, stop=self.stop_event, max_backoff=self.options.max_backoff
        )

    def load_model(self) -> None:
        """Ask the coordinator for the schema, load the base model with LoRA, tokenise."""
        opts = self.options
        schema = self._fetch_schema()
        self.schema = schema
        self.lora = LoraSettings.from_dict(schema.lora_config.model_dump())
        self.tensor_shapes = {k: tuple(v) for k, v in schema.tensors.items()}
        self.device = resolve_device(self._device_option())
        base_name = opts.base_model or schema.base_model
        if opts.load_in_4bit:
            from fedmoe.worker.qlora import load_quantized_base

            base = load_quantized_base(base_name, device=self._device_option())
        else:
            base = load_base_model(base_name, device=self._device_option())
        self.fingerprint, self.tokenizer = base.fingerprint, base.tokenizer
        self.model = attach_lora(base.model, self.lora)
        self.pad_id = self.tokenizer.pad_token_id
        max_length = opts.train.max_length
        self.train_set = tokenize_training_set(
            self.examples, self.tokenizer, max_length=max_length, source=opts.dataset
        )
        self.eval_set = tokenize_examples(self.eval_examples, self.tokenizer, max_length=max_length)
        self.trainer = build_trainer(
            self.model,
            self.train_set,
            opts.train,
            planned_steps=opts.max_steps,
            pad_token_id=self.pad_id,
            device=self.device,
            learning_rate=opts.train.learning_rate_for(base_name),
            **self._trainer_extras(),
        )

    # Seams for a job spread over several processes (fedmoe.worker.ddp_job).

    def _fetch_schema(self) -> SchemaInfo:
        """The coordinator's schema (base model, LoRA shape), retried while it is down."""
        schema: SchemaInfo = self._wait_for(self.client.schema)
        return schema

    def _device_option(self) -> str:
        """The device this process trains on, as ``--device`` names it."""
        return self.options.device

    def _trainer_extras(self) -> dict[str, Any]:
        """Further keyword arguments of ``LocalTrainer`` (the DDP context of a rank)."""
        return {}

    def _ready_info(self, version: int) -> dict[str, Any]:
        """What the ready file says."""
        return {
            "pid": os.getpid(),
            "worker_id": self.options.worker_id,
            "specialty": self.options.specialty,
            "expert_version": version,
        }

    def register(self) -> None:
        """Register with the coordinator, pull the expert, then write the ready file."""
        if self.model is None or self.lora is None:
            raise RuntimeError("load_model() must run before register()")
        opts = self.options
        identity = SyncIdentity(
            worker_id=opts.worker_id,
            specialty=opts.specialty,
            fingerprint=self.fingerprint,
            lora_config=self.lora.to_dict(),
            tensor_shapes=self.tensor_shapes,
            upload_dtype=getattr(torch, opts.upload_dtype),
        )
        syncer = Syncer(
            self.client,
            PeftAdapterSlot(self.model),
            identity,
            stats=self.stats,
            clock=self.clock,
            sync_interval=opts.sync_interval,
            max_backoff=opts.max_backoff,
            pull_wait=opts.effective_pull_wait,
            round_phase=time.time if opts.align_syncs else None,
        )
        self.syncer = syncer
        self._wait_for(syncer.register)
        self._wait_for(syncer.pull_and_reset)
        self._wait_for(
            lambda: share_signature(
                self.client,
                worker_id=opts.worker_id,
                specialty=opts.specialty,
                model=self.model,
                tokenizer=self.tokenizer,
                fingerprint=self.fingerprint,
                examples=self.examples,
                noise=opts.signature_noise,
            )
        )
        self.fed_eval = FederatedEvaluator.for_job(self)
        self.fed_eval.extra_kinds.append(RoutedEvaluation.for_job(self))
        logger.info(
            "%s: %d training and %d validation examples, expert %s v%d on %s",
            opts.worker_id,
            len(self.train_set),
            len(self.eval_set),
            opts.specialty,
            syncer.base_version,
            self.device,
        )
        self._write_ready_file(syncer.base_version)

    def _write_ready_file(self, version: int) -> None:
        """Tell a start script we are registered and about to train (atomic rename)."""
        path = self.options.ready_file
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        info = self._ready_info(version)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(info) + "\n")
        os.replace(temporary, path)

    # --- training --------------------------------------------------------------------------

    def train(self) -> None:
        """Train until stopped (signal, ``max_steps`` or ``max_seconds``), syncing on schedule."""
        if self.trainer is None or self.syncer is None:
            raise RuntimeError("setup() must run before train()")
        # Time limits and rates count training only, not model loading and registration.
        self.stats.started = self.clock.now()
        self.stats.reset_window()
        self.syncer.schedule_first()
        while not self._should_stop():
            began = self.clock.now()
            result = self.trainer.step()
            if self.options.slowdown > 1.0:
                extra = (self.options.slowdown - 1.0) * (self.clock.now() - began)
                self.clock.sleep(extra, self.stop_event)
            if result.skipped:
                self.stats.skipped_steps += 1
                continue
            self.stats.steps += 1
            self.stats.tokens += result.tokens
            self.stats.window_tokens += result.tokens
            if result.tokens:  # a DP step on an empty Poisson batch has no loss
                self.stats.window_losses.append(result.loss)
            self._sync_at_step_boundary(self.syncer)

    def _sync_at_step_boundary(self, syncer: Syncer) -> None:
        """Collect (and rebase onto) a finished background sync, or start one when due."""
        if syncer.in_flight():
            synced = syncer.poll()
            if synced:
                self._after_sync(syncer)
        elif syncer.due():
            self._note_privacy()
            if self.options.sync_mode == "background":
                syncer.start()
            else:
                self.sync()

    def _note_privacy(self) -> None:
        """Put the spent ε in the stats, whence the next upload reports it."""
        if isinstance(self.trainer, PrivateTrainer):
            self.stats.dp_epsilon = self.trainer.spent_epsilon()

    def _should_stop(self) -> bool:
        opts = self.options
        if isinstance(self.trainer, PrivateTrainer) and self.trainer.budget_spent:
            plan = self.trainer.privacy  # (checked once: the training loop ends here)
            logger.warning(
                "%s: privacy budget spent (ε %.4g of %s at δ %.3g after %d DP-SGD steps); "
                "no more training: uploading what is left, then stopping",
                opts.worker_id,
                self.trainer.spent_epsilon(),
                plan.target_epsilon,
                plan.delta,
                self.trainer.steps,
            )
            return True
        if opts.max_steps is not None and self.stats.steps >= opts.max_steps:
            return True
        elapsed = self.clock.now() - self.stats.started
        if opts.max_seconds is not None and elapsed >= opts.max_seconds:
            return True
        return self.stop_event.is_set()

    def sync(self) -> bool:
        """One sync now (see ``Syncer.sync``); False if it must be retried."""
        if self.syncer is None:
            raise RuntimeError("setup() must run before sync()")
        synced = self.syncer.sync()
        if synced:
            self._after_sync(self.syncer)
        return synced

    def _after_sync(self, syncer: Syncer) -> None:
        if self.fed_eval is not None:
            self.fed_eval.after_sync(syncer.base_version, syncer.pulled)

    # --- cleanup ---------------------------------------------------------------------------

    def cleanup(self, *, final_attempts: int = 5) -> dict[str, Any]:
        """Upload what is left (bounded retries), evaluate, and close the client."""
        if self.syncer is not None:
            self._finish_background_sync(self.syncer)
        if self.syncer is not None and self.stats.steps > 0:
            self._note_privacy()
            self.syncer.flush(attempts=final_attempts)  # inline: nothing runs after us
        if self.fed_eval is not None and self.syncer is not None:
            self.fed_eval.finish(self.syncer.base_version, self.syncer.pulled)
        self.summary = self._summary()
        logger.info("%s finished: %s", self.options.worker_id, self.summary)
        if self.options.ready_file is not None:
            self.options.ready_file.unlink(missing_ok=True)
        self.client.close()
        return self.summary

    def _finish_background_sync(self, syncer: Syncer) -> None:
        """Wait for the sync in flight (it is rebased) and stop the background thread."""
        try:
            if syncer.wait():
                self._after_sync(syncer)
        except FatalSyncError as error:
            logger.error("background sync failed: %s", error)
        finally:
            syncer.close()

    def _summary(self) -> dict[str, Any]:
        stats = self.stats
        elapsed = max(self.clock.now() - stats.started, 1e-9)
        syncs = stats.uploads + stats.failed_syncs
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
            "blocked_seconds_per_sync": stats.blocked_seconds / max(syncs, 1),
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "bytes_up_per_sync": stats.bytes_up / max(syncs, 1),
            "bytes_down_per_sync": stats.bytes_down / max(syncs, 1),
            "skipped_pulls": stats.skipped_pulls,
            "settled_pulls": stats.settled_pulls,
            "partial_rounds": stats.partial_rounds,
            "sync_mode": self.options.sync_mode,
            "expert_version": self.syncer.base_version if self.syncer else None,
            "unsent_tokens": stats.window_tokens,
            "dp_epsilon": stats.dp_epsilon,
        }
        if self.model is not None and self.eval_set:
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
