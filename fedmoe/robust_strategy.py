"""FedBuff with robust aggregation: a poisoning worker in the buffer cannot win.

The buffer keeps each update apart (its s(τ)·clip·Δ); when it is applied, an optional
outlier test rejects updates far from the rest (norm over k × the median norm, or a
direction opposite to the coordinate-wise median), and the rest are combined by their
(token-weighted) mean, coordinate-wise median or trimmed mean (pure functions in
``aggregate``). What it decided about each update is kept in the state as ``verdicts``,
which the coordinator records in the ledger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fedmoe import aggregate, robust_aggregate
from fedmoe.aggregate import AdapterState
from fedmoe.fields import RobustAggregation, ServerLr
from fedmoe.server_strategy import (
    Contribution,
    FedBuffStrategy,
    Outcome,
    ServerOptimizer,
    StrategyState,
    _lr,
)

# A member is down-weighted when left out of more coordinates than a typical member (2t/n
# for a trim of t of n) plus this share of the rest: a median of 3 leaves a typical
# member out of 2/3 of the coordinates, so only one left out of more than 92% counts.
DOWN_WEIGHTED_SHARE = 0.75

Verdicts = tuple[tuple[str, str, str], ...]  # (update id, 'rejected' | 'down-weighted', reason)


@dataclass(frozen=True)
class RobustOptions:
    """How a robust buffer combines its updates."""

    aggregation: RobustAggregation = "none"
    trim_fraction: float = 0.25
    outlier_test: bool = False
    outlier_norm_factor: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not self.outlier_norm_factor > 1.0:
            raise ValueError(f"outlier norm factor must be > 1, got {self.outlier_norm_factor}")

    @property
    def active(self) -> bool:
        """Whether anything differs from FedBuff's plain mean."""
        return self.aggregation != "none" or self.outlier_test


class RobustBuffStrategy(FedBuffStrategy):
    """FedBuff whose buffer is combined robustly (see the module docstring)."""

    def __init__(
        self,
        *,
        optimizer: ServerOptimizer,
        robust: RobustOptions,
        server_lr: ServerLr = 1.0,
        buffer_size: int = 2,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(
            optimizer=optimizer, server_lr=server_lr, buffer_size=buffer_size, timeout=timeout
        )
        self.robust = robust

    def receive(self, params: AdapterState, update: Contribution, state: StrategyState) -> Outcome:
        """Keep the update apart in the buffer; combine when full or timed out."""
        member = aggregate.scale(update.delta, update.decay * update.clip)
        state = replace(
            state,
            members=(*state.members, member),
            member_weights=(*state.member_weights, update.token_factor),
            mass=state.mass + update.token_factor,
            update_ids=(*state.update_ids, update.update_id),
            opened_at=state.opened_at if state.opened_at is not None else update.now,
            verdicts=(),
        )
        coeff = update.decay * update.clip * update.token_factor
        fill = len(state.update_ids)
        if fill < (self.buffer_size or 1) and not self.due(state, update.now):
            return Outcome(None, state, coeff, fill=fill)
        lr = _lr(self.server_lr, update, fill)
        new, new_state = self.apply(params, state, lr)
        rejected = any(v[0] == update.update_id and v[1] == "rejected" for v in new_state.verdicts)
        return Outcome(new, new_state, 0.0 if rejected else lr * coeff / state.mass)

    def apply(
        self, params: AdapterState, state: StrategyState, lr: float
    ) -> tuple[AdapterState, StrategyState]:
        """Step along the robust combination of the buffer and empty it."""
        grad, verdicts = self.combine(state)
        emptied = replace(
            state,
            buffer=None,
            members=(),
            member_weights=(),
            mass=0.0,
            update_ids=(),
            opened_at=None,
            verdicts=verdicts,
        )
        return self.optimizer.step(params, grad, lr, emptied)

    def combine(self, state: StrategyState) -> tuple[AdapterState, Verdicts]:
        """The buffer's robust aggregate and (update id, verdict, reason) per outlier."""
        members, ids = state.members, state.update_ids
        assert members, "an empty buffer is never applied"
        options = self.robust
        reasons: list[str | None] = [None] * len(members)
        if options.outlier_test:
            reasons = robust_aggregate.outlier_reasons(
                members, norm_factor=options.outlier_norm_factor
            )
        kept = [i for i, reason in enumerate(reasons) if reason is None]
        verdicts = [(ids[i], "rejected", r) for i, r in enumerate(reasons) if r is not None]
        chosen = [members[i] for i in kept]
        if options.aggregation == "none":
            weights = aggregate.normalize_weights([state.member_weights[i] for i in kept])
            return aggregate.weighted_average(chosen, weights), tuple(verdicts)
        count = len(chosen)
        trim = (count - 1) // 2  # the median: trim all but the middle one or two
        if options.aggregation == "trimmed_mean":
            trim = min(math.floor(options.trim_fraction * count), trim)
        grad, shares = robust_aggregate.trimmed_mean(chosen, trim)
        expected = 2 * trim / count  # the share a typical member is left out of
        threshold = expected + DOWN_WEIGHTED_SHARE * (1.0 - expected)
        name = options.aggregation.replace("_", " ")
        verdicts += [
            (ids[i], "down-weighted", f"{share:.0%} of its coordinates left out by the {name}")
            for i, share in zip(kept, shares)
            if share > threshold
        ]
        return grad, tuple(verdicts)
