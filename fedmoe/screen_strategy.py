"""The asynchronous rule with an update screen: a poisoning worker is caught without a buffer.

Each arriving update is judged against the expert's recent updates: its norm against
``norm_factor`` × the (lower) median of the latest norms of the other workers whose latest
update was accepted (one entry per worker, the last ``history`` workers: a worker that
uploads often cannot crowd the others out, a rejected one has no vote) — a scaled
attack; and its direction against the exponential average of the accepted directions (a
flipped sign: cosine below ``min_cosine``). While fewer than ``min_workers`` other
workers' latest updates were accepted, the update is accepted unjudged (the warm-up; it
also ends a deadlock: when every honest worker's norm changes at once, say a new learning
rate, the first ones are rejected, the next pass unjudged and the rest are judged against
them, so the screen follows within about one round): a lone worker, and each worker of
the one-worker-per-expert demo, is never judged, so it is applied exactly as by
``AsyncStrategy``. An accepted update is applied by that rule untouched
(θ + η·s(τ)·clip·Δ, bit for bit); a rejected one is applied with weight 0 (θ + 0·Δ: θ
unchanged, a new version) and its verdict and reason go to the ledger. The history lives
in the ``StrategyState`` (``recent``, ``direction``), so it is durable through the
snapshots and recomputed by replaying the write-ahead log.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedmoe import aggregate, robust_aggregate
from fedmoe.aggregate import AdapterState
from fedmoe.fields import ServerLr
from fedmoe.server_strategy import (
    AsyncStrategy,
    Contribution,
    Outcome,
    Seen,
    ServerOptimizer,
    StrategyState,
    folding,
)


@dataclass(frozen=True)
class ScreenOptions:
    """How the update screen judges an update against the recently accepted ones."""

    norm_factor: float = 3.0
    min_cosine: float = 0.0
    history: int = 16
    min_workers: int = 2

    def __post_init__(self) -> None:
        if not self.norm_factor > 1.0:
            raise ValueError(f"screen norm factor must be > 1, got {self.norm_factor}")
        if not -1.0 <= self.min_cosine < 1.0:
            raise ValueError(f"screen min cosine must be in [-1, 1), got {self.min_cosine}")
        if self.history < 2:
            raise ValueError(f"screen history must be >= 2 updates, got {self.history}")
        if not 1 <= self.min_workers < self.history:
            raise ValueError(f"screen min workers must be in 1..history-1, got {self.min_workers}")

    @property
    def keep(self) -> float:
        """The direction average's decay: it remembers about ``history`` updates."""
        return 1.0 - 1.0 / self.history


class ScreenedAsyncStrategy(AsyncStrategy):
    """``AsyncStrategy`` that first screens each update (see the module docstring)."""

    def __init__(
        self,
        *,
        optimizer: ServerOptimizer,
        screen: ScreenOptions,
        server_lr: ServerLr = 1.0,
        rounds: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, server_lr=server_lr, rounds=rounds)
        self.screen = screen
        self.keep = screen.keep  # --server-lr agree reads the screen's direction average

    @property
    def stateful(self) -> bool:
        """It keeps the accepted history between updates."""
        return True

    def begin(self, params: AdapterState, update: Contribution, state: StrategyState) -> Outcome:
        """Reject an outlier (weight 0), else apply the update as the async rule does (its
        direction averaged in by ``Outcome.later``: only the next update is judged by it)."""
        norm = aggregate.global_norm(update.delta) if update.norm is None else update.norm
        reason = self.judge(update, norm, state)
        recent = self.seen(state.recent, update.worker_id, norm, accepted=reason is None)
        if reason is not None:
            verdict = ((update.update_id, "rejected", reason),)
            # θ + 0·Δ, as a worker rebuilds it from the acknowledgement (a -0.0 becomes 0.0)
            unchanged = aggregate.apply_update(params, update.delta, 0.0)
            return Outcome(unchanged, replace(state, recent=recent, verdicts=verdict), 0.0)
        outcome = self.step(params, update, replace(state, verdicts=()))
        outcome = replace(outcome, state=replace(outcome.state, recent=recent))
        # a lone worker is never judged: its expert carries no direction (a second full-size
        # tensor in memory and in every snapshot) until another worker has uploaded
        if state.direction is not None or any(w != update.worker_id for w, _, _ in state.recent):
            outcome = replace(outcome, later=folding(update, norm, self.keep))
        return outcome

    def judge(self, update: Contribution, norm: float, state: StrategyState) -> str | None:
        """Why ``update`` is rejected, or None (also during the warm-up)."""
        # other workers whose latest update was accepted: a rejected attacker has no vote
        others = [n for w, n, ok in state.recent if ok and w != update.worker_id]
        if len(others) < self.screen.min_workers or state.direction is None:
            return None
        return robust_aggregate.history_reason(
            norm,
            aggregate.cosine(update.delta, state.direction, norm),
            others,
            norm_factor=self.screen.norm_factor,
            min_cosine=self.screen.min_cosine,
        )

    def seen(
        self, recent: tuple[Seen, ...], worker: str, norm: float, *, accepted: bool
    ) -> tuple[Seen, ...]:
        """The latest norm and verdict of each of the last ``history`` workers, this one's
        now the newest: one entry per worker, so a worker that uploads often cannot crowd
        the others out."""
        kept = tuple(entry for entry in recent if entry[0] != worker)
        return (*kept, (worker, norm, accepted))[-self.screen.history :]
