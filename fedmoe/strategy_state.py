"""What server strategies exchange and keep: one update as a strategy sees it
(``Contribution``), what became of it (``Outcome``), and an expert's durable strategy state
(``StrategyState``: a FedBuff buffer, optimizer moments, the update screen's history, an
open FedAvg round), stored as one safetensors file of prefixed PEFT names plus JSON scalars.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from fedmoe.aggregate import AdapterState

BUFFER, FIRST, SECOND, DIRECTION = "buffer.", "m.", "v.", "direction."
MEMBER = "member.{:04d}."  # one buffered update, kept apart for robust aggregation
ROUND = "round.{:04d}."  # one update of the open FedAvg round (``fedmoe.fedavg_round``)
ROUND_BASE = "round_base."  # the expert as the open round's updates found it
FOREVER = 1 << 30  # a count of updates after which keep**count is 0.0
Seen = tuple[str, float, bool]  # the update screen's (worker id, ‖Δ‖, accepted)
# an update of the open round: (update id, tokens, gain s(τ)·clip, weight applied with)
RoundMember = tuple[str, int, float, float]


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
    # the open FedAvg round (``fedmoe.fedavg_round``): the version its updates were made
    # from and the expert then, and each update's scalars and delta, until the last
    # active worker's update closes it
    round_base: int | None = None
    round_params: AdapterState | None = None
    round_members: tuple[RoundMember, ...] = ()
    round_deltas: tuple[AdapterState, ...] = ()

    @property
    def empty(self) -> bool:
        """Whether there is nothing to keep (today's rule keeps nothing)."""
        screened = bool(self.recent) or self.direction is not None or bool(self.round_members)
        return self.buffer is None and self.first is None and self.steps == 0 and not screened

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors under prefixed PEFT names, for one safetensors file."""
        out: dict[str, torch.Tensor] = {}
        parts = [(BUFFER, self.buffer), (FIRST, self.first), (SECOND, self.second)]
        parts += [(DIRECTION, self.direction), (ROUND_BASE, self.round_params)]
        for prefix, state in parts:
            out.update({prefix + key: value.contiguous() for key, value in (state or {}).items()})
        for pattern, states in ((MEMBER, self.members), (ROUND, self.round_deltas)):
            for index, member in enumerate(states):
                prefix = pattern.format(index)
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
        if self.round_members:
            values |= {"round_base": self.round_base}
            values |= {"round_members": [list(m) for m in self.round_members]}
        return {"fedmoe_strategy_state": json.dumps(values)}

    @classmethod
    def from_parts(
        cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> StrategyState:
        """The inverse of ``tensors`` and ``scalars``."""
        values = json.loads(metadata["fedmoe_strategy_state"])
        parts = {
            prefix: {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            for prefix in (BUFFER, FIRST, SECOND, DIRECTION, ROUND_BASE)
        }
        weights = tuple(float(w) for w in values.get("member_weights", ()))
        in_round = tuple(
            (str(u), int(n), float(g), float(w)) for u, n, g, w in values.get("round_members", ())
        )
        return cls(
            round_base=values.get("round_base"),
            round_params=parts[ROUND_BASE] or None,
            round_members=in_round,
            round_deltas=_numbered(tensors, ROUND, len(in_round)),
            members=_numbered(tensors, MEMBER, len(weights)),
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


def _numbered(
    tensors: dict[str, torch.Tensor], pattern: str, count: int
) -> tuple[AdapterState, ...]:
    """The ``count`` states kept under ``pattern``'s numbered prefixes."""
    prefixes = [pattern.format(i) for i in range(count)]
    return tuple(
        {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        for prefix in prefixes
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
    # the other active workers' updates of this round still to come: the sender's pull
    # waits for them (``UpdateAck.settle_version``); with rounds, the last one closes it
    round_left: int = 0
    base_version: int = -1  # the version the delta was made from (-1: not logged)
    staleness: int = 0  # τ: versions applied since ``base_version``
    num_tokens: int = 0  # X-FedMoE-Num-Tokens (0: unknown)


@dataclass(frozen=True)
class RoundClose:
    """How the last update of a FedAvg round made the new expert: θ at version ``base``
    plus the weighted mean of the round's deltas, ``earlier`` ones (update id, weight) in
    order and then its own (``Outcome.weight``), as ``aggregate.weighted_average`` sums
    them; incremental pulls replay it."""

    base: int
    earlier: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Outcome:
    """What became of an update: new parameters (None: buffered) and the new state."""

    params: AdapterState | None
    state: StrategyState
    weight: float  # the update's effective weight in the step (or in the buffer)
    fill: int = 0  # updates left in the buffer
    close: RoundClose | None = None  # the update closed a FedAvg round
    # state work the acknowledgement need not wait for (averaging the update's direction
    # in): the complete state is ``later(state)``, which ``settled()`` computes
    later: Callable[[StrategyState], StrategyState] | None = field(
        default=None, compare=False, repr=False
    )

    def settled(self) -> Outcome:
        """This outcome with its ``later`` work done (its state complete)."""
        if self.later is None:
            return self
        return replace(self, state=self.later(self.state), later=None)
