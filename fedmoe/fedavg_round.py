"""FedAvg rounds inside the asynchronous rule (``--fedavg-rounds``, on by default).

Equally fast workers on one expert upload in rounds: each pulls version v, trains one
sync interval and uploads a delta made from v. The asynchronous rule applies each one at
once (θ + η·s(τ)·clip·Δ, η = 1/K for K active workers), so the expert moves as the
deltas arrive and nobody waits; but it weights them equally, where a FedAvg round weights
them by their token counts. So the update that completes a round (no other active
worker's update made from v is still to come) makes the expert anew from θ_v:
θ_v + Σ α_i·Δ_i, with α from ``aggregate.round_weights``: the total weight the round's
updates were applied with, shared in proportion to tokens. For K equally fast workers
that is FedAvg's n_i/N, summed as ``aggregate.weighted_average`` sums it: the round ends
bit for bit where a synchronous FedAvg round would.

A round stays open only while nothing else moves the expert: it opens with an update at
staleness 0 whose round has other updates to come, and each next update must find
exactly the round's earlier ones applied since v. Any other update (a straggler's, one
made from another version, a rejected one) ends it as it is: its updates keep the
weights they were applied with, as without rounds. While open, the expert at v and the
round's deltas are part of the durable ``StrategyState``.
"""

from __future__ import annotations

from dataclasses import replace

from fedmoe import aggregate
from fedmoe.aggregate import AdapterState
from fedmoe.strategy_state import Contribution, Outcome, RoundClose, RoundMember, StrategyState


def receive(
    params: AdapterState, update: Contribution, state: StrategyState, weight: float
) -> Outcome:
    """θ + weight·Δ, the update joining (or opening) its round; or, for the round's last
    update, the expert made anew from the round's start (``Outcome.close`` says how)."""
    member = (update.update_id, update.num_tokens, update.decay * update.clip, weight)
    if _continues(update, state):
        if update.round_left == 0:
            return _close(update, state, member)
        state = _join(state, member, update.delta)
    else:
        state = ended(state)
        if update.staleness == 0 and update.round_left > 0:  # it opens a round
            opened = replace(state, round_base=update.base_version, round_params=params)
            state = _join(opened, member, update.delta)
    return Outcome(aggregate.apply_update(params, update.delta, weight), state, weight)


def ended(state: StrategyState) -> StrategyState:
    """``state`` without an open round."""
    if state.round_base is None:
        return state
    return replace(state, round_base=None, round_params=None, round_members=(), round_deltas=())


def _continues(update: Contribution, state: StrategyState) -> bool:
    """Whether the update belongs to the open round: made from its version, with only the
    round's earlier updates applied since."""
    return (
        state.round_base is not None
        and update.base_version == state.round_base
        and update.staleness == len(state.round_members)
    )


def _join(state: StrategyState, member: RoundMember, delta: AdapterState) -> StrategyState:
    return replace(
        state,
        round_members=(*state.round_members, member),
        round_deltas=(*state.round_deltas, delta),
    )


def _close(update: Contribution, state: StrategyState, last: RoundMember) -> Outcome:
    """θ_v + the round's deltas weighted by ``aggregate.round_weights``."""
    assert state.round_base is not None and state.round_params is not None
    members = (*state.round_members, last)
    final = aggregate.round_weights(
        [m[3] for m in members], [m[1] for m in members], [m[2] for m in members]
    )
    mean = aggregate.weighted_average([*state.round_deltas, update.delta], final)
    new = aggregate.apply_update(state.round_params, mean, 1.0)
    earlier = tuple((m[0], w) for m, w in zip(state.round_members, final, strict=False))
    close = RoundClose(base=state.round_base, earlier=earlier)
    return Outcome(new, ended(state), final[-1], close=close)
