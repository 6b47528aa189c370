"""The coordinator's side of server strategies: which one, its per-expert state, and
the weights of each update.

The state of an expert changes only under that expert's lock. It is durable through
the write-ahead log (a replay recomputes it) and the snapshots (``journal``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from typing import Any

from fedmoe.aggregate import (
    AdapterState,
    auto_server_lr,
    counted_staleness,
    token_factor,
    typical_staleness,
)
from fedmoe.coordinator.ledger import Ledger
from fedmoe.coordinator.ledger_rows import Activity
from fedmoe.coordinator.replay import strategy_from
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.robust_strategy import RobustOptions
from fedmoe.schemas import StrategyStatus
from fedmoe.screen_strategy import ScreenedAsyncStrategy, ScreenOptions
from fedmoe.server_strategy import AsyncStrategy, Contribution, Strategy, StrategyState


def build_strategy(settings: CoordinatorSettings) -> Strategy:
    """The strategy the settings choose, built from the description a log record keeps
    (``replay.strategy_from``): one place decides which class takes which arguments."""
    description: dict[str, Any] = {
        "strategy": settings.strategy,
        "optimizer": settings.server_optimizer,
        "momentum": settings.effective_server_momentum,
        "eps": settings.server_eps,
        "server_lr": settings.effective_server_lr,
        "buffer_size": settings.buffer_size,
        "timeout": settings.buffer_timeout,
    }
    if settings.rounds_apply:
        description["rounds"] = True
    robust = RobustOptions(
        aggregation=settings.robust_aggregation,
        trim_fraction=settings.trim_fraction,
        outlier_test=settings.outlier_test,
        outlier_norm_factor=settings.outlier_norm_factor,
    )
    if settings.strategy == "fedbuff" and robust.active:
        description["robust"] = asdict(robust)
    elif settings.strategy != "fedbuff" and settings.screen_updates:
        description["screen"] = asdict(
            ScreenOptions(
                norm_factor=settings.screen_norm_factor,
                min_cosine=settings.screen_min_cosine,
                history=settings.screen_history,
                min_workers=settings.screen_min_workers,
            )
        )
    return strategy_from(description)


class StrategyBook:
    """The strategy and every expert's durable state of it."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        ledger: Ledger,
        strategy: Strategy,
        states: dict[str, StrategyState],
        lsns: dict[str, int],
    ) -> None:
        self.settings, self.ledger, self.strategy = settings, ledger, strategy
        self.states = dict(states)
        # the log record that last changed each state (0: none kept)
        self.seqs = {name: lsns[name] if not states[name].empty else 0 for name in states}
        self._lock = threading.Lock()  # guards the swap of states / seqs
        self.decay = settings.staleness_decay()  # s(τ) of the counted staleness
        for state in self.states.values():  # verdicts of a crash before they were noted
            ledger.record_verdicts(state.verdicts)

    def contribution(
        self,
        *,
        update_id: str,
        worker_id: str,
        expert: str,
        delta: AdapterState,
        base_version: int,
        staleness: int,
        clip: float,
        num_tokens: int,
        norm: float | None = None,
    ) -> Contribution:
        """One update with the weights the settings ask for (activity from the ledger):
        its decay s(τ) of the staleness counted for the workers active on the expert
        (a worker that stopped after ``base_version`` still counts: same round)."""
        now = time.time()
        grace = self.settings.staleness_grace
        needs_activity = self.strategy.server_lr in ("auto", "mean", "agree")
        needs_activity = needs_activity or self.settings.token_weighting or grace
        rounds = isinstance(self.strategy, AsyncStrategy) and self.strategy.rounds
        needs_activity = needs_activity or rounds  # a round closes when nobody is yet to send
        activity = (
            self.ledger.recent_activity(
                expert, now - self.settings.activity_window, seen_from=base_version
            )
            if needs_activity
            else Activity()
        )
        factor = 1.0
        if self.settings.token_weighting and num_tokens > 0:
            # n / n̄ with this update in the mean: equal token counts give exactly 1
            tokens = activity.tokens
            factor = token_factor(num_tokens, (sum(tokens) + num_tokens) / (len(tokens) + 1))
        active = len(activity.workers | {worker_id})
        return Contribution(
            typical_decay=self.decay(
                counted_staleness(typical_staleness(active), active, grace=grace)
            ),
            worker_id=worker_id,
            norm=norm,
            update_id=update_id,
            delta=delta,
            decay=self.decay(counted_staleness(staleness, active, grace=grace)),
            clip=clip,
            token_factor=factor,
            active_workers=active,
            now=now,
            round_left=activity.yet_to_send(base_version, besides=worker_id),
            base_version=base_version,
            staleness=staleness,
            num_tokens=num_tokens,
        )

    def flush_lr(self, expert: str, contributions: int) -> float:
        """η for applying a buffer of ``contributions`` updates without a new upload."""
        server_lr = self.strategy.server_lr
        if server_lr != "auto":
            return float(server_lr)
        since = time.time() - self.settings.activity_window
        activity = self.ledger.recent_activity(expert, since)
        return auto_server_lr(len(activity.workers), contributions)

    def publish(self, expert: str, state: StrategyState, lsn: int) -> None:
        """Make a committed state current (``lsn``: the log record that made it)."""
        if not self.strategy.stateful and state.empty:
            return
        with self._lock:
            self.states = {**self.states, expert: state}
            self.seqs = {**self.seqs, expert: lsn}
        # after the commit, not in it; a crash in between is caught up at start-up
        # from the state, which keeps the verdicts
        self.ledger.record_verdicts(state.verdicts)

    def settle(self, expert: str, state: StrategyState) -> None:
        """Make current the complete state of the update ``publish`` made current (its
        ``Outcome.later`` work done; the same log record, its verdicts noted already)."""
        with self._lock:
            self.states = {**self.states, expert: state}

    def status(self, expert: str) -> StrategyStatus:
        """The expert's strategy and its state, for ``/v1/status``."""
        state, strategy = self.states[expert], self.strategy
        return StrategyStatus(
            strategy=strategy.name,
            optimizer=strategy.optimizer.kind,
            server_lr=strategy.server_lr,
            momentum=strategy.optimizer.momentum,
            token_weighting=self.settings.token_weighting,
            buffer_size=strategy.buffer_size,
            buffer_fill=len(state.update_ids),
            buffered_update_ids=list(state.update_ids),
            buffer_age=None if state.opened_at is None else max(0.0, time.time() - state.opened_at),
            optimizer_steps=state.steps,
            state_seq=self.seqs[expert],
            robust_aggregation=self.settings.robust_aggregation,
            outlier_test=self.settings.outlier_test,
            screen_updates=isinstance(strategy, ScreenedAsyncStrategy),
            fedavg_rounds=isinstance(strategy, AsyncStrategy) and strategy.rounds,
            round_fill=len(state.round_members),
            last_verdicts=[list(v) for v in state.verdicts],
        )
