"""Server-side aggregation strategies (Flower style) over the pure functions in ``aggregate``.

A strategy receives one update (a delta and its weights) together with the expert's
parameters and the ``StrategyState`` it keeps for that expert, and returns an
``Outcome``: new parameters, or ``None`` when the update was only buffered, and the new
state. Nothing here touches files or the ledger; the coordinator makes the state durable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from fedmoe import aggregate, fedavg_round, robust_aggregate
from fedmoe.aggregate import AdapterState
from fedmoe.fields import SERVER_OPTIMIZERS, ServerLr, ServerOptimizerKind
from fedmoe.strategy_state import (
    FOREVER,
    Contribution,
    Outcome,
    RoundClose,
    RoundMember,
    Seen,
    StrategyState,
)

__all__ = [
    "FOREVER",
    "AsyncStrategy",
    "Contribution",
    "FedBuffStrategy",
    "Outcome",
    "RoundClose",
    "RoundMember",
    "Seen",
    "ServerOptimizer",
    "Strategy",
    "StrategyState",
    "fold_direction",
]

ADAM_BETA2 = 0.99  # FedAdam's second-moment decay
#: --server-lr agree without the update screen: the direction average remembers about
#: this many updates (the screen's default --screen-history; with the screen, its own)
AGREEMENT_HISTORY = 16


class ServerOptimizer:
    """A server optimizer over a pseudo-gradient (the aggregated delta)."""

    def __init__(
        self, *, kind: ServerOptimizerKind = "sgd", momentum: float = 0.0, eps: float = 1e-3
    ) -> None:
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer must be one of {SERVER_OPTIMIZERS}, got {kind!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum!r}")
        if not eps > 0:
            raise ValueError(f"server eps must be > 0, got {eps!r}")
        self.kind, self.momentum, self.eps = kind, momentum, eps

    @property
    def stateful(self) -> bool:
        """Whether it keeps moments between steps."""
        return self.kind == "adam" or self.momentum > 0

    def step(
        self, params: AdapterState, grad: AdapterState, lr: float, state: StrategyState
    ) -> tuple[AdapterState, StrategyState]:
        """θ after one step of ``lr`` along ``grad``, and the state with the new moments."""
        if self.kind == "adam":
            moments = (state.first, state.second) if state.first and state.second else None
            new, (m, v) = aggregate.adam_step(
                params, grad, lr, moments, beta1=self.momentum, beta2=ADAM_BETA2, eps=self.eps
            )
            return new, replace(state, first=m, second=v, steps=state.steps + 1)
        new, velocity = aggregate.sgd_step(
            params, grad, lr, state.first, momentum=self.momentum, nesterov=self.kind == "nesterov"
        )
        if velocity is None:
            return new, state
        return new, replace(state, first=velocity, steps=state.steps + 1)


def _lr(server_lr: ServerLr, update: Contribution, contributions: int) -> float:
    """η for a step made of ``contributions`` updates ('agree' is ``AsyncStrategy``'s)."""
    if server_lr == "auto":
        return aggregate.auto_server_lr(update.active_workers, contributions)
    if server_lr == "mean" and contributions == 1:
        return aggregate.mean_server_lr(update.active_workers, update.typical_decay)
    if server_lr in ("mean", "agree"):
        raise ValueError(f"server lr {server_lr!r} is for the 'async' strategy only")
    return float(server_lr)


def fold_direction(
    state: StrategyState, update: Contribution, norm: float, keep: float
) -> StrategyState:
    """``state`` with the update's unit direction averaged into ``direction`` (and counted)."""
    direction = robust_aggregate.direction_average(state.direction, update.delta, norm, keep)
    return replace(state, direction=direction, folded=state.folded + 1)


def folding(
    update: Contribution, norm: float, keep: float
) -> Callable[[StrategyState], StrategyState]:
    """``fold_direction`` of ``update``, to be done later (``Outcome.later``)."""
    return lambda state: fold_direction(state, update, norm, keep)


class AsyncStrategy:
    """FedMoE's rule: θ ← θ + η·s(τ)·clip·Δ for every update at once (with an optional
    server optimizer over s(τ)·clip·Δ as the pseudo-gradient)."""

    name = "async"

    def __init__(
        self, *, optimizer: ServerOptimizer, server_lr: ServerLr = 1.0, rounds: bool = False
    ) -> None:
        if rounds and optimizer.stateful:
            raise ValueError("FedAvg rounds need the plain rule: no server optimizer state")
        self.optimizer, self.server_lr, self.rounds = optimizer, server_lr, rounds
        self.buffer_size: int | None = None
        self.keep = 1.0 - 1.0 / AGREEMENT_HISTORY  # the direction average's decay

    @property
    def stateful(self) -> bool:
        """Whether it keeps state between updates (a stateful optimizer, 'agree', rounds)."""
        return self.optimizer.stateful or self.server_lr == "agree" or self.rounds

    def lr(self, update: Contribution, state: StrategyState) -> float:
        """η for this update: 'agree' from the agreement of the recent directions."""
        if self.server_lr != "agree":
            return _lr(self.server_lr, update, 1)
        agreement = aggregate.agreement(state.direction, state.folded, self.keep)
        return aggregate.agreement_server_lr(update.active_workers, agreement)

    def receive(self, params: AdapterState, update: Contribution, state: StrategyState) -> Outcome:
        """Apply one update now, its state complete (``begin(...).settled()``)."""
        return self.begin(params, update, state).settled()

    def begin(self, params: AdapterState, update: Contribution, state: StrategyState) -> Outcome:
        """Apply one update now; what only the next update needs (the direction average of
        'agree') is left in ``Outcome.later``, so that the acknowledgement need not wait."""
        return self.follow(self.step(params, update, state), update)

    def step(self, params: AdapterState, update: Contribution, state: StrategyState) -> Outcome:
        """θ + η·s(τ)·clip·Δ (through the server optimizer, if one keeps moments)."""
        lr = self.lr(update, state)
        if not self.rounds:  # a round left open by a run with rounds: not waited for
            state = fedavg_round.ended(state)
        if not self.optimizer.stateful and self.optimizer.kind == "sgd":
            # today's rule, bit for bit: θ + w·Δ with w = η·s(τ)·clip (· token factor)
            weight = lr * update.decay * update.clip * update.token_factor
            if self.rounds:
                return fedavg_round.receive(params, update, state, weight)
            return Outcome(aggregate.apply_update(params, update.delta, weight), state, weight)
        coeff = update.decay * update.clip * update.token_factor
        new, new_state = self.optimizer.step(
            params, aggregate.scale(update.delta, coeff), lr, state
        )
        return Outcome(new, new_state, lr * coeff)

    def follow(self, outcome: Outcome, update: Contribution) -> Outcome:
        """'agree': average the update's direction in (a lone worker's expert keeps none)."""
        state = outcome.state
        if self.server_lr != "agree" or (state.direction is None and update.active_workers < 2):
            return outcome
        norm = aggregate.global_norm(update.delta) if update.norm is None else update.norm
        return replace(outcome, later=folding(update, norm, self.keep))


class FedBuffStrategy:
    """FedBuff (Nguyen et al. 2022): buffer K weighted deltas, then step along their mean.

    A partial buffer is applied by the first update that arrives ``timeout`` seconds or
    more after the buffer opened, or by ``flush`` (the coordinator's timer).
    """

    name = "fedbuff"

    def __init__(
        self,
        *,
        optimizer: ServerOptimizer,
        server_lr: ServerLr = 1.0,
        buffer_size: int = 2,
        timeout: float = 60.0,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer size must be >= 1, got {buffer_size}")
        if server_lr in ("mean", "agree"):
            raise ValueError(f"server lr {server_lr!r} is for the 'async' strategy only")
        if not timeout > 0:
            raise ValueError(f"buffer timeout must be > 0, got {timeout}")
        self.optimizer, self.server_lr = optimizer, server_lr
        self.buffer_size: int | None = buffer_size
        self.timeout = timeout

    stateful = True

    def receive(self, params: AdapterState, update: Contribution, state: StrategyState) -> Outcome:
        """Add one update to the buffer; step when it is full or has waited ``timeout``."""
        coeff = update.decay * update.clip * update.token_factor
        state = replace(
            state,
            buffer=aggregate.accumulate(state.buffer, update.delta, coeff),
            mass=state.mass + update.token_factor,
            update_ids=(*state.update_ids, update.update_id),
            opened_at=state.opened_at if state.opened_at is not None else update.now,
        )
        if len(state.update_ids) < (self.buffer_size or 1) and not self.due(state, update.now):
            return Outcome(None, state, coeff, fill=len(state.update_ids))
        lr = _lr(self.server_lr, update, len(state.update_ids))
        new, new_state = self.apply(params, state, lr)
        return Outcome(new, new_state, lr * coeff / state.mass)

    def begin(self, params: AdapterState, update: Contribution, state: StrategyState) -> Outcome:
        """``receive``: a buffer leaves no work for later."""
        return self.receive(params, update, state)

    def due(self, state: StrategyState, now: float) -> bool:
        """Whether a non-empty buffer has waited ``timeout`` seconds."""
        return state.opened_at is not None and now - state.opened_at >= self.timeout

    def apply(
        self, params: AdapterState, state: StrategyState, lr: float
    ) -> tuple[AdapterState, StrategyState]:
        """Step along the buffer's mean and empty it."""
        assert state.buffer is not None and state.mass > 0
        grad = aggregate.scale(state.buffer, 1.0 / state.mass)
        emptied = replace(state, buffer=None, mass=0.0, update_ids=(), opened_at=None)
        return self.optimizer.step(params, grad, lr, emptied)


Strategy = AsyncStrategy | FedBuffStrategy
