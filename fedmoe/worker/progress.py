"""What a worker tracks between syncs: the upload in flight and its training counters."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fedmoe.aggregate import AdapterState


@dataclass
class PendingUpdate:
    """An upload whose answer we do not have yet."""

    update_id: str
    body: bytes
    base_version: int
    tokens: int
    train_loss: float | None
    snapshot: AdapterState
    loss_count: int = 0
    dp_epsilon: float | None = None  # privacy spent by the training in it (DP-SGD)
    maybe_delivered: bool = False  # an earlier attempt may have reached the coordinator


@dataclass
class WorkerStats:
    """Counters for progress lines and the final summary."""

    started: float = field(default_factory=time.monotonic)
    steps: int = 0
    skipped_steps: int = 0  # non-finite loss or gradient: nothing was learned
    tokens: int = 0
    window_tokens: int = 0
    window_losses: list[float] = field(default_factory=list)
    blocked_seconds: float = 0.0  # the training thread waiting on sync (capture, rebase, I/O)
    bytes_up: int = 0  # upload bodies sent, every attempt counted
    bytes_down: int = 0  # float32 tensor bytes of expert pulls after the first
    full_pulls: int = 0  # downloads of the expert after an upload (or to rebase)
    skipped_pulls: int = 0  # new experts rebuilt from the acknowledgement, digest checked
    digest_mismatches: int = 0  # rebuilt expert differed: pulled instead
    incremental_pulls: int = 0  # new experts rebuilt from the steps since our pull
    settled_pulls: int = 0  # pulls that waited for the round and got all of it
    partial_rounds: int = 0  # pulls whose wait ran out before the round's updates were in
    uploads: int = 0
    failed_syncs: int = 0
    last_staleness: int | None = None
    last_version: int = 0
    dp_epsilon: float | None = None  # ε spent so far (DP-SGD workers), as of the last sync

    def window_loss(self) -> float | None:
        """Mean train loss since the last successful upload."""
        return sum(self.window_losses) / len(self.window_losses) if self.window_losses else None

    def reset_window(self) -> None:
        """Start a new sync window."""
        self.window_tokens, self.window_losses = 0, []

    def settle(self, pending: PendingUpdate) -> None:
        """Remove what ``pending`` carried from the window (it was acked or refused)."""
        self.window_tokens -= pending.tokens
        del self.window_losses[: pending.loss_count]
