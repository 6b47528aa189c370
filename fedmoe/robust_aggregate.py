"""Robust aggregation's pure functions: coordinate-wise trimmed mean and median over a
FedBuff buffer, the buffer's outlier test, and the update screen's judgment of one update
against the accepted history (with the direction average it keeps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedmoe.aggregate import AdapterState, cosine, global_norm, scale
from fedmoe.parallel import per_tensor

# --- robust aggregation over a buffer (Byzantine-robust FedBuff) ------------------------------


def trimmed_mean(
    members: Sequence[Mapping[str, torch.Tensor]], trim: int
) -> tuple[AdapterState, list[float]]:
    """Coordinate-wise trimmed mean: drop the ``trim`` smallest and largest values of every
    coordinate and average the rest (Yin et al. 2018).

    Also returns, per member, the share of its coordinates that were dropped: how much a
    member was down-weighted (an outlier is dropped almost everywhere).
    """
    count = len(members)
    if not members or not 0 <= 2 * trim < count:
        raise ValueError(f"cannot trim {trim} from each end of {count} updates")
    result: AdapterState = {}
    dropped = torch.zeros(count, dtype=torch.float64)
    total = 0
    for key in members[0]:
        stacked = torch.stack([m[key] for m in members])
        ordered, order = stacked.sort(dim=0)
        result[key] = ordered[trim : count - trim].mean(dim=0)
        if trim:
            outside = torch.cat([order[:trim], order[count - trim :]]).flatten()
            dropped += torch.bincount(outside, minlength=count).double()
        total += stacked[0].numel()
    return result, (dropped / max(total, 1)).tolist()


def coordinate_median(
    members: Sequence[Mapping[str, torch.Tensor]],
) -> tuple[AdapterState, list[float]]:
    """Coordinate-wise median (the mean of the two middle values for an even count), and
    each member's share of coordinates left out (see ``trimmed_mean``)."""
    return trimmed_mean(members, (len(members) - 1) // 2)


def outlier_reasons(
    members: Sequence[Mapping[str, torch.Tensor]], *, norm_factor: float, min_cosine: float = 0.0
) -> list[str | None]:
    """Why each member is an outlier of the buffer, or None to keep it.

    A member whose norm exceeds ``norm_factor`` × the buffer's median norm is rejected
    (a scaled attack); then one whose cosine to the coordinate-wise median of the members kept so
    far is below ``min_cosine`` (a flipped sign). Fewer than 3 members: no majority, all kept.
    """
    if len(members) < 3:
        return [None] * len(members)
    norms = [global_norm(m) for m in members]
    median_norm = float(torch.tensor(norms).median())
    reasons: list[str | None] = [
        f"norm {n:.4g} > {norm_factor:g} x the buffer's median norm {median_norm:.4g}"
        if n > norm_factor * median_norm
        else None
        for n in norms
    ]
    kept = [m for m, r in zip(members, reasons) if r is None]
    if len(kept) < 3:
        return reasons
    reference, _ = coordinate_median(kept)
    for index, member in enumerate(members):
        if reasons[index] is None:
            value = cosine(member, reference)
            if value < min_cosine:
                reasons[index] = (
                    f"cosine {value:.3f} to the buffer's coordinate-wise median < {min_cosine:g}"
                )
    return reasons


# --- screening single updates against the accepted history (no buffer) ----------------------


def history_reason(
    norm: float,
    cosine_to_recent: float | None,
    recent_norms: Sequence[float],
    *,
    norm_factor: float,
    min_cosine: float,
) -> str | None:
    """Why one update is an outlier of the recently accepted ones, or None to accept it.

    Its norm over ``norm_factor`` × the (lower) median of ``recent_norms`` (a scaled attack), or its
    cosine to the recent accepted direction below ``min_cosine`` (a flipped sign). An
    empty history judges nothing (the caller's warm-up).
    """
    if not recent_norms:
        return None
    median_norm = float(torch.tensor(list(recent_norms), dtype=torch.float64).median())
    if norm > norm_factor * median_norm:
        return f"norm {norm:.4g} > {norm_factor:g} x the others' median {median_norm:.4g}"
    if cosine_to_recent is not None and cosine_to_recent < min_cosine:
        return f"cosine {cosine_to_recent:.3f} to the recent accepted direction < {min_cosine:g}"
    return None


def direction_average(
    average: Mapping[str, torch.Tensor] | None,
    delta: Mapping[str, torch.Tensor],
    norm: float,
    keep: float,
) -> AdapterState:
    """keep·average + (1 − keep)·Δ/‖Δ‖: an exponential average of accepted directions
    (unit vectors, so one large update does not dominate it)."""
    step = (1.0 - keep) / norm if norm > 0 else 0.0
    if average is None:
        return scale(delta, step)
    # two passes per tensor, one new tensor, on two threads: it runs on every accepted update
    keys = list(average)
    return per_tensor(
        lambda key: (keep * average[key]).add_(delta[key], alpha=step),
        keys,
        [average[key].numel() for key in keys],
    )
