"""Server-side aggregation strategies (Flower style) over the pure functions in ``aggregate``.

A strategy receives one update (a delta and its weights) together with the expert's
parameters and the ``StrategyState`` it keeps for that expert, and returns an
``Outcome``: new parameters, or ``None`` when the update was only buffered, and the new
state. Nothing here touches files or the ledger; the coordinator makes the state durable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch

from fedmoe import aggregate, robust_aggregate
from fedmoe.aggregate import AdapterState
from fedmoe.fields import SERVER_OPTIMIZERS, ServerLr, ServerOptimizerKind

BUFFER, FIRST, SECOND, DIRECTION = "buffer.", "m.", "v.", "direction."
MEMBER = "member.{:04d}."  # one buffered update, kept apart for robust aggregation
ADAM_BETA2 = 0.99  # FedAdam's second-moment decay
#: --server-lr agree without the update screen: the direction average remembers about
#: this many updates (the screen's default --screen-history; with the screen, its own)
AGREEMENT_HISTORY = 16
FOREVER = 1 << 30  # a count of updates after which keep**count is 0.0
Seen = tuple[str, float, bool]  # the update screen's (worker id, ‖Δ‖, accepted)


@dataclass(frozen=True)
class StrategyState:
    """What a strategy keeps for one expert: a FedBuff buffer and server optimizer moments."""

    buffer: AdapterState | None = None  # Σ c_i·Δ_i of the buffered updates
    mass: float = 0.0  # Σ of their token factors: the buffer's mean is buffer / mass
    update_ids: tuple[str, ...] = ()
    opened_at: float | None = None  # wall time of the buffer's first update
    first: AdapterState | None = None  # momentum velocity, or Adam's m
    second: AdapterState | None = None  # Adam's v
    steps: int = 0
    # robust aggregation: each buffered s(τ)·clip·Δ apart, with its token factor
    members: tuple[AdapterState, ...] = ()
    member_weights: tuple[float, ...] = ()
    # what robust aggregation decided at the last application: (update id, verdict, reason)
    verdicts: tuple[tuple[str, str, str], ...] = ()
    # the update screen (``fedmoe.screen_strategy``): (worker id, ‖Δ‖, accepted) of each
    # recent worker's latest update, and the average direction of the accepted updates
    recent: tuple[Seen, ...] = ()
    direction: AdapterState | None = None
    folded: int = 0  # updates averaged into ``direction`` (--server-lr agree weighs them)

    @property
    def empty(self) -> bool:
        """Whether there is nothing to keep (today's rule keeps nothing)."""
        screened = bool(self.recent) or self.direction is not None
        return self.buffer is None and self.first is None and self.steps == 0 and not screened

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors under prefixed PEFT names, for one safetensors file."""
        out: dict[str, torch.Tensor] = {}
        parts = (BUFFER, self.buffer), (FIRST, self.first), (SECOND, self.second)
        for prefix, state in (*parts, (DIRECTION, self.direction)):
            out.update({prefix + key: value.contiguous() for key, value in (state or {}).items()})
        for index, member in enumerate(self.members):
            prefix = MEMBER.format(index)
            out.update({prefix + key: value.contiguous() for key, value in member.items()})
        return out

    def scalars(self) -> dict[str, str]:
        """The scalars as safetensors metadata (JSON floats round-trip exactly)."""
        values = {"mass": self.mass, "update_ids": list(self.update_ids)}
        values |= {"opened_at": self.opened_at, "steps": self.steps}
        if self.members or self.verdicts:
            values |= {"member_weights": list(self.member_weights)}
            values |= {"verdicts": [list(v) for v in self.verdicts]}
        if self.recent:
            values |= {"recent": [list(r) for r in self.recent]}
        if self.folded:
            values |= {"folded": self.folded}
        return {"fedmoe_strategy_state": json.dumps(values)}

    @classmethod
    def from_parts(
        cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> StrategyState:
        """The inverse of ``tensors`` and ``scalars``."""
        values = json.loads(metadata["fedmoe_strategy_state"])
        parts = {
            prefix: {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            for prefix in (BUFFER, FIRST, SECOND, DIRECTION)
        }
        weights = tuple(float(w) for w in values.get("member_weights", ()))
        members = tuple(
            {
                k[len(MEMBER.format(i)) :]: v
                for k, v in tensors.items()
                if k.startswith(MEMBER.format(i))
            }
            for i in range(len(weights))
        )
        return cls(
            members=members,
            member_weights=weights,
            verdicts=tuple((str(a), str(b), str(c)) for a, b, c in values.get("verdicts", ())),
            buffer=parts[BUFFER] or None,
            mass=float(values["mass"]),
            update_ids=tuple(values["update_ids"]),
            opened_at=values["opened_at"],
            first=parts[FIRST] or None,
            second=parts[SECOND] or None,
            steps=int(values["steps"]),
            recent=tuple((str(w), float(n), bool(a)) for w, n, a in values.get("recent", ())),
            direction=parts[DIRECTION] or None,
            # a direction kept before the count was: taken as long since warmed up
            folded=int(values.get("folded", FOREVER if parts[DIRECTION] else 0)),
        )


@dataclass(frozen=True)
class Contribution:
    """One update as a strategy sees it: the delta and what weighs it."""

    update_id: str
    delta: AdapterState
    decay: float  # s(τ)
    clip: float  # ‖Δ‖ bound / ‖Δ‖, or 1
    token_factor: float  # n / n̄, or 1 without token weighting
    active_workers: int  # for --server-lr auto, mean and agree
    now: float
    worker_id: str = ""  # who sent it (the update screen counts distinct workers)
    norm: float | None = None  # ‖Δ‖ as the ledger records it (None: not computed yet)
    typical_decay: float = 1.0  # s(K − 1) for K active workers (--server-lr mean)
    # the other active workers' updates of this round still to come (not in the log: it
    # only tells the sender which version to pull, ``UpdateAck.settle_version``)
    round_left: int = 0


@dataclass(frozen=True)
class Outcome:
    """What became of an update: new parameters (None: buffered) and the new state."""

    params: AdapterState | None
    state: StrategyState
    weight: float  # the update's effective weight in the step (or in the buffer)
    fill: int = 0  # updates left in the buffer


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


class AsyncStrategy:
    """FedMoE's rule: θ ← θ + η·s(τ)·clip·Δ for every update at once (with an optional
    server optimizer over s(τ)·clip·Δ as the pseudo-gradient)."""

    name = "async"

    def __init__(self, *, optimizer: ServerOptimizer, server_lr: ServerLr = 1.0) -> None:
        self.optimizer, self.server_lr = optimizer, server_lr
        self.buffer_size: int | None = None
        self.keep = 1.0 - 1.0 / AGREEMENT_HISTORY  # the direction average's decay

    @property
    def stateful(self) -> bool:
        """Whether it keeps state between updates (a stateful optimizer, or 'agree')."""
        return self.optimizer.stateful or self.server_lr == "agree"

    def lr(self, update: Contribution, state: StrategyState) -> float:
        """η for this update: 'agree' from the agreement of the recent directions."""
        if self.server_lr != "agree":
            return _lr(self.server_lr, update, 1)
        agreement = aggregate.agreement(state.direction, state.folded, self.keep)
        return aggregate.agreement_server_lr(update.active_workers, agreement)

    def receive(self, params: AdapterState, update: Contribution, state: StrategyState) -> Outcome:
        """Apply one update now."""
        return self.follow(self.step(params, update, state), update)

    def step(self, params: AdapterState, update: Contribution, state: StrategyState) -> Outcome:
        """θ + η·s(τ)·clip·Δ (through the server optimizer, if one keeps moments)."""
        lr = self.lr(update, state)
        if not self.optimizer.stateful and self.optimizer.kind == "sgd":
            # today's rule, bit for bit: θ + w·Δ with w = η·s(τ)·clip (· token factor)
            weight = lr * update.decay * update.clip * update.token_factor
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
        return replace(outcome, state=fold_direction(state, update, norm, self.keep))


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
