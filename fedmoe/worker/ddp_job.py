"""One worker on N processes: ``torchrun --nproc-per-node N -m fedmoe worker ...``.

Every rank loads the data and the model and trains on its share of each global
micro-batch (``LocalTrainer`` under DDP: same step as one process with the same
``--batch-size``). Rank 0 alone talks to the coordinator: schema, registration, pulls,
uploads, the domain signature and federated evaluation. At each step boundary the ranks
agree on two flags (an all-reduce): *stop* (any rank was told to stop, or rank 0's
``--max-steps`` / ``--max-seconds`` is reached) and *rebased* (rank 0 loaded a new
adapter from a sync); on *rebased* rank 0 broadcasts its LoRA parameters. The step
results are already global, so the tokens and the summary count all ranks.

When a rank dies, the collective the others are in fails (gloo and NCCL notice the
closed connection; a hung rank is caught by the collective timeout): the job stops with
a ``RankFailure`` naming it, and rank 0 first makes its final upload of the last
complete step, as on any stop.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist
from peft import PeftModel

from fedmoe.aggregate import AdapterState
from fedmoe.data import Example
from fedmoe.modeling import lora_parameters
from fedmoe.schemas import SchemaInfo
from fedmoe.worker.distributed import (
    DistContext,
    RankFailure,
    init_from_env,
    launched_by_torchrun,
    shutdown,
)
from fedmoe.worker.job import PeftAdapterSlot, WorkerClient, WorkerJob
from fedmoe.worker.options import WorkerOptions
from fedmoe.worker.speed import SpeedSetupError
from fedmoe.worker.sync_seams import Clock

__all__ = ["DistributedWorkerJob", "RankFailure", "make_job"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What a collective raises when a peer is gone (gloo: "Connection closed by peer",
# "Connection reset"; NCCL: "NCCL error", watchdog timeouts).
_PEER_ERRORS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer")


def make_job(options: WorkerOptions, examples: list[Example] | None = None) -> WorkerJob:
    """A ``DistributedWorkerJob`` under torchrun (WORLD_SIZE > 1), else a ``WorkerJob``
    (``examples``: ``options.dataset`` already loaded)."""
    if not launched_by_torchrun():
        return WorkerJob(options, examples=examples)
    if options.train.private:
        # Opacus' Poisson sampling and accountant assume one process holds the data
        raise SpeedSetupError(
            "DP-SGD (--dp-epsilon / --dp-noise-multiplier) runs in one process: "
            "start this worker without torchrun"
        )
    return DistributedWorkerJob(options, init_from_env(options.device), examples=examples)


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank is gone."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(word in text for word in _PEER_ERRORS)


class TrackingSlot(PeftAdapterSlot):
    """The adapter slot of rank 0's syncer: remembers that a rebase loaded new weights."""

    def __init__(self, model: PeftModel) -> None:
        super().__init__(model)
        self.changed = False

    def load(self, state: AdapterState) -> None:
        """Load, and mark the adapter for a broadcast at the next step boundary."""
        super().load(state)
        self.changed = True

    def rebase(self, since: AdapterState, newest: AdapterState) -> None:
        """Rebase in place, and mark the adapter for a broadcast likewise."""
        super().rebase(since, newest)
        self.changed = True


class _NoCoordinator:
    """The client of ranks other than 0: they never talk to the coordinator."""

    def __getattr__(self, name: str) -> Any:
        if name == "close":
            return lambda: None
        raise RuntimeError(f"only rank 0 talks to the coordinator (called {name})")


class DistributedWorkerJob(WorkerJob):
    """A ``WorkerJob`` spread over the ranks of a torchrun launch (see the module doc)."""

    def __init__(
        self,
        options: WorkerOptions,
        context: DistContext,
        *,
        client: WorkerClient | None = None,
        clock: Clock | None = None,
        examples: list[Example] | None = None,
    ) -> None:
        if not context.is_main:
            client = _NoCoordinator()
        super().__init__(options, client=client, clock=clock, examples=examples)
        self.dist = context
        self.rank_pids: list[int] = []
        self.slot: TrackingSlot | None = None
        self.trained_together = False  # training ended on every rank without a failure

    # --- setup: rank 0 asks, everyone hears ---------------------------------------------------

    def _together(self, what: str, action: Callable[[], T]) -> T | None:
        """Run ``action`` (None on ranks that skip it); if any rank failed, every rank stops."""
        result, failed = None, None
        try:
            result = action()
        except BaseException as error:
            failed = error
        (anyone,) = self.dist.any_flags(failed is not None)
        if failed is not None:
            raise failed
        if anyone:
            raise RankFailure(f"another rank failed while {what}; see its log")
        return result

    def load_data(self) -> None:
        """Every rank reads the dataset (the same file, at the same path on every node)."""
        self._together("loading the data", super().load_data)

    def _fetch_schema(self) -> SchemaInfo:
        fetched = self._together(
            "asking the coordinator for its schema",
            lambda: (
                super(DistributedWorkerJob, self)._fetch_schema() if self.dist.is_main else None
            ),
        )
        data = self.dist.broadcast_json(fetched.model_dump(mode="json") if fetched else None)
        return SchemaInfo.model_validate(data)

    def _device_option(self) -> str:
        return str(self.dist.device)

    def _trainer_extras(self) -> dict[str, Any]:
        return {"dist": self.dist}

    def load_model(self) -> None:
        """Every rank loads the base model with LoRA; the ranks' pids are gathered."""
        self._together("loading the model", super().load_model)
        self.rank_pids = self.dist.gather_ints(os.getpid())

    def register(self) -> None:
        """Rank 0 registers, pulls and shares the signature; then all get its adapter."""
        if self.dist.is_main:
            self._together("registering", super().register)
            if self.syncer is not None and self.model is not None:
                self.slot = TrackingSlot(self.model)
                self.syncer.adapter = self.slot
        else:
            self._together("registering", lambda: None)
        self._broadcast_adapter()

    def _ready_info(self, version: int) -> dict[str, Any]:
        return {**super()._ready_info(version), "ranks": self.rank_pids}

    def _broadcast_adapter(self) -> None:
        if self.model is None:
            raise RuntimeError("load_model() must run first")
        parameters = [p for _, p in sorted(lora_parameters(self.model).items())]
        self.dist.broadcast_parameters(parameters)

    # --- training --------------------------------------------------------------------------

    def _should_stop(self) -> bool:
        """The step boundary every rank meets: agree on stopping, share a rebase."""
        mine = super()._should_stop() if self.dist.is_main else self.stop_event.is_set()
        rebased = self.slot is not None and self.slot.changed
        stop, rebased = self.dist.any_flags(mine, rebased)
        if rebased:
            self._broadcast_adapter()
            if self.slot is not None:
                self.slot.changed = False
        return stop

    def train(self) -> None:
        """Rank 0: the worker's loop (syncs included); others: steps in lockstep."""
        try:
            if self.dist.is_main:
                super().train()
            else:
                self._follow()
            self.trained_together = True
        except Exception as error:
            if not is_peer_failure(error):
                raise
            detail = re.sub(r"\[[^\]]*\.(cc|cpp):\d+\]\s*", "", str(error))  # gloo's source
            detail = detail.split(". ")[0][:200]
            raise RankFailure(
                f"rank {self.dist.rank} of {self.dist.world_size}: another rank died or stopped "
                f"answering ({type(error).__name__}: {detail})"
            ) from error

    def _follow(self) -> None:
        if self.trainer is None:
            raise RuntimeError("setup() must run before train()")
        while not self._should_stop():
            result = self.trainer.step()
            if not result.skipped:
                self.stats.steps += 1
                self.stats.tokens += result.tokens

    # --- cleanup ---------------------------------------------------------------------------

    def cleanup(self, *, final_attempts: int = 5) -> dict[str, Any]:
        """Rank 0: the final upload, evaluation and summary; the others wait for it when
        every rank is still there, so that none leaves the process group (and tears down
        its threads) while rank 0 still works."""
        if not self.trained_together:  # a rank failed: rank 0 uploads what it has, alone
            if self.dist.is_main:
                return super().cleanup(final_attempts=final_attempts)
            self.summary = {}
            return self.summary
        finish = super().cleanup
        summary = self._together(
            "finishing", lambda: finish(final_attempts=final_attempts) if self.dist.is_main else {}
        )
        self.summary = summary or {}
        return self.summary

    def _summary(self) -> dict[str, Any]:
        return {**super()._summary(), "ranks": self.dist.world_size}

    def run(self) -> dict[str, Any]:
        """setup → train → cleanup on every rank; a dead rank is a ``RankFailure``."""
        try:
            return super().run()
        except RankFailure as error:
            if self.dist.is_main and self.syncer is not None:
                left = "nothing left unsent" if not self.syncer.has_unsent() else "upload failed"
                raise RankFailure(
                    f"{error}; stopped after {self.stats.steps} steps, final upload from rank 0: "
                    f"{left} (expert v{self.syncer.base_version})"
                ) from error
            raise
        finally:
            shutdown()
