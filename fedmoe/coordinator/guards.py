"""Overflow guards of the update path: no Inf or NaN is ever stored or merged.

A finite delta can still overflow float32 when applied, and a finite set of experts can
still overflow in the gateway merge. Both are checked cheaply from bounds first
(max|θ + w·Δ| <= max|θ| + w·‖Δ‖) and scanned only near float32's limit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmoe import aggregate
from fedmoe.aggregate import AdapterState
from fedmoe.coordinator import errors
from fedmoe.coordinator.versions import GATEWAY_SAFE_BOUND, SAFE_ABS_BOUND
from fedmoe.strategy import GatewayMerge


def new_abs_bound(
    old_bound: float, step: float, new_state: AdapterState, *, update_id: str, expert: str
) -> float:
    """A bound of max|θ| after an update that moved θ by at most ``step`` (max-norm); the
    new state is scanned (``InvalidUpdateError`` naming a non-finite tensor) only where
    that bound comes near the float32 limit."""
    bound = old_bound + step
    if bound < SAFE_ABS_BOUND:
        return bound
    for key, tensor in new_state.items():
        if not torch.isfinite(tensor).all():
            raise errors.InvalidUpdateError(
                f"applying update {update_id} would make {key} of expert {expert} "
                "non-finite (float32 overflow); send a smaller delta"
            )
    return aggregate.max_abs(new_state)


def merge_is_finite(
    merger: GatewayMerge,
    weights: list[float],
    states: list[AdapterState],
    bounds: Sequence[float],
) -> bool:
    """Whether merging ``states`` gives finite tensors; merges only near float32's limit."""
    if max(bounds) < GATEWAY_SAFE_BOUND:
        return True
    merged = merger.merge(states, weights)
    return all(bool(torch.isfinite(tensor).all()) for tensor in merged.values())
