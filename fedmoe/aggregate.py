"""Pure numeric functions: staleness decay, the update rule and gateway merges.

An adapter state is a ``dict`` from PEFT state-dict keys to float32 tensors.
Nothing here knows about HTTP or files (big per-tensor work runs on ``fedmoe.parallel``'s
two threads, with the same results); the strategy classes pick among these functions.
Robust aggregation and the update screen's math are in ``fedmoe.robust_aggregate``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch

from fedmoe.parallel import per_tensor

AdapterState = dict[str, torch.Tensor]

LORA_A = ".lora_A."
LORA_B = ".lora_B."


# --- staleness decay s(tau) ------------------------------------------------------------------


def constant_decay(staleness: int) -> float:
    """s(τ) = 1: every update counts fully, however stale."""
    return 1.0


def inverse_linear_decay(staleness: int, a: float = 0.1) -> float:
    """s(τ) = 1 / (1 + a·τ), FedMoE's default with a = 0.1."""
    return 1.0 / (1.0 + a * staleness)


def polynomial_decay(staleness: int, a: float = 0.5) -> float:
    """s(τ) = (1 + τ)^-a, FedAsync's polynomial staleness function."""
    return float((1.0 + staleness) ** (-a))


def hinge_decay(staleness: int, a: float = 10.0, b: int = 4) -> float:
    """s(τ) = 1 for τ <= b, else 1 / (a·(τ - b) + 1) (FedAsync's hinge)."""
    if staleness <= b:
        return 1.0
    return 1.0 / (a * (staleness - b) + 1.0)


def exponential_decay(staleness: int, a: float = 0.1) -> float:
    """s(τ) = exp(-a·τ)."""
    return math.exp(-a * staleness)


# --- the update rule -------------------------------------------------------------------------


def apply_update(
    params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], scale: float
) -> AdapterState:
    """Return θ + scale·Δ for every tensor; ``params`` is left untouched."""
    keys = list(params)
    numels = [params[key].numel() for key in keys]
    return per_tensor(lambda key: _plus_scaled(params[key], delta[key], scale), keys, numels)


def _plus_scaled(theta: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """θ + scale·Δ, bit for bit, with one new tensor instead of two: the product (exactly Δ
    when scale is 1) is made first and θ added into it (float addition commutes exactly)."""
    if theta.dtype != torch.float32 or delta.dtype != torch.float32 or theta.shape != delta.shape:
        return theta + scale * delta
    if scale == 1.0:
        return theta + delta
    return (delta * scale).add_(theta)


def global_norm(state: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors taken together."""
    # float64 accumulation without a float64 copy of each tensor
    norms = [torch.linalg.vector_norm(t, dtype=torch.float64) for t in state.values()]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def max_abs(state: Mapping[str, torch.Tensor]) -> float:
    """The largest absolute value in any tensor (NaN if any value is NaN)."""
    values = [t.abs().max() for t in state.values() if t.numel()]
    return float(torch.stack(values).max()) if values else 0.0


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Scale non-negative weights to sum to one."""
    if not weights or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("at least one weight must be positive")
    return [w / total for w in weights]


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> AdapterState:
    """Σ_k w_k·state_k, tensor by tensor (weights are used as given)."""
    keys = states[0].keys()
    # sum() starts from the int 0, so mypy sees Tensor | int; the result is a tensor.
    return {
        key: cast(torch.Tensor, sum(w * s[key] for w, s in zip(weights, states))) for key in keys
    }


# --- gateway merges --------------------------------------------------------------------------


def lora_pairs(state: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """The (lora_A key, lora_B key) pairs of an adapter, in key order."""
    pairs = []
    for key in sorted(state):
        if LORA_A in key:
            partner = key.replace(LORA_A, LORA_B)
            if partner not in state:
                raise ValueError(f"adapter has {key} but no matching {partner}")
            pairs.append((key, partner))
    return pairs


def merge_linear(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> AdapterState:
    """Average the A and B factors separately (mean(B)·mean(A), not mean(B·A))."""
    return weighted_average(states, weights)


def merge_cat(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> AdapterState:
    """Stack the factors so that B_cat·A_cat = Σ_k w_k·B_k·A_k exactly.

    The result has rank Σ_k r_k; the caller keeps PEFT's scaling alpha/r equal
    to the experts' by raising alpha in proportion (``fedmoe.strategy``).
    """
    merged: AdapterState = {}
    for key_a, key_b in lora_pairs(states[0]):
        merged[key_a] = torch.cat([s[key_a] for s in states], dim=0)
        merged[key_b] = torch.cat([w * s[key_b] for w, s in zip(weights, states)], dim=1)
    return merged


def merge_svd(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], rank: int
) -> AdapterState:
    """Re-factorise Σ_k w_k·B_k·A_k at ``rank`` by truncated SVD (the best rank-r fit)."""
    merged: AdapterState = {}
    for key_a, key_b in lora_pairs(states[0]):
        stacked_b = torch.cat([w * s[key_b].double() for w, s in zip(weights, states)], dim=1)
        stacked_a = torch.cat([s[key_a].double() for s in states], dim=0)
        u, sigma, vh = _svd_of_product(stacked_b, stacked_a, rank)
        root = sigma[:rank].sqrt()
        merged[key_b] = (u[:, :rank] * root).float().contiguous()
        merged[key_a] = (root[:, None] * vh[:rank]).float().contiguous()
    return merged


def _svd_of_product(
    b: torch.Tensor, a: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of B·A (B: out×k, A: k×in) through QR of the factors when k is small:
    B·A = Q_b·(R_b·R_aᵀ)·Q_aᵀ, so only the k×k core is decomposed. At real sizes (out and in
    in the thousands, k = experts × r) that is hundreds of times faster than decomposing
    the out×in product, with the same singular values and subspaces."""
    inner = b.shape[1]
    if not rank <= inner <= min(b.shape[0], a.shape[1]):
        u, sigma, vh = torch.linalg.svd(b @ a, full_matrices=False)
        return u, sigma, vh
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u, sigma, vh @ q_a.T


# --- server strategies: learning rate, token weights, buffers, server optimizers ------------


def auto_server_lr(active_workers: int, contributions: int = 1) -> float:
    """η = min(1, c/K) for a step made of c updates while K workers are active on the expert.

    One update at a time (async) gets 1/K, so K workers' deltas move the expert by their
    mean, as a FedAvg round would; a full FedBuff buffer of K updates gets 1.
    """
    return min(1.0, contributions / max(1, active_workers))


def ema_weight_sums(count: int, keep: float) -> tuple[float, float]:
    """Σw and Σw² of the weights w_j = (1 − keep)·keep^j an exponential average gives its
    ``count`` newest entries (j = 0 the newest)."""
    total = 1.0 - keep**count
    squares = (1.0 - keep) ** 2 * (1.0 - keep ** (2 * count)) / (1.0 - keep**2)
    return total, squares


def agreement(direction: Mapping[str, torch.Tensor] | None, count: int, keep: float) -> float:
    """The weighted mean pairwise cosine c of the unit directions u_j averaged into
    ``direction`` = Σ_j w_j·u_j (``direction_average``, ``count`` of them): from
    ‖D‖² = Σ w_j² + Σ_{i≠j} w_i·w_j·cos(u_i, u_j), c = (‖D‖² − Σw²) / ((Σw)² − Σw²).

    1 when every direction was the same, about 0 for unrelated (noise) directions,
    negative when they alternate; 0 with fewer than two.
    """
    if direction is None or count < 2:
        return 0.0
    total, squares = ema_weight_sums(count, keep)
    return (dot(direction, direction) - squares) / (total * total - squares)


def typical_staleness(active_workers: int) -> int:
    """K − 1: the staleness of an update when K equally fast workers take turns (each sees
    the other K − 1 updates applied between its pull and its upload)."""
    return max(1, active_workers) - 1


def counted_staleness(staleness: int, active_workers: int, *, grace: bool) -> int:
    """The staleness the decay sees: with ``grace``, τ − (K − 1) and at least 0.

    K equally fast workers each see up to the other K − 1 updates of a round applied
    between their pull and their upload; only staleness beyond that marks a lagging one.
    """
    if not grace:
        return staleness
    return max(0, staleness - typical_staleness(active_workers))


def mean_server_lr(active_workers: int, typical_decay: float) -> float:
    """η = 1 / (K·s(K−1)), at most 1, with ``typical_decay`` = s(K−1).

    An update at the typical staleness K − 1 is applied with weight η·s(K−1) = 1/K: K
    workers taking turns move the expert by the mean of their deltas, as a FedAvg round
    does, instead of s(K−1) times that (the decay only tells fresher updates from staler
    ones); a lone worker gets η = 1 (its delta, plainly).
    """
    workers = max(1, active_workers)
    if workers == 1:
        return 1.0
    if not typical_decay > 0:
        return 1.0 / workers
    return min(1.0, 1.0 / (workers * typical_decay))


def agreement_server_lr(active_workers: int, agreement: float) -> float:
    """η = 1/K + (1 − 1/K)·c for K active workers whose recent deltas agree by c ∈ [0, 1].

    For K deltas of pairwise cosine c, ‖ΣΔ‖² / (K·Σ‖Δ‖²) = (1 + (K−1)·c) / K: the sum's
    share of the norms. Deltas that agree (far from an optimum, a direction that holds)
    move the expert by their sum, as K sequential workers would; unrelated ones (noise
    near an optimum) by their mean, as FedAvg would; a lone worker by its delta (η = 1).
    """
    workers = max(1, active_workers)
    if workers == 1:
        return 1.0
    return 1.0 / workers + (1.0 - 1.0 / workers) * min(1.0, max(0.0, agreement))


def token_factor(num_tokens: int, mean_tokens: float) -> float:
    """n / n̄: an update's token count relative to the recent mean (1 when either is unknown)."""
    if num_tokens <= 0 or mean_tokens <= 0:
        return 1.0
    return num_tokens / mean_tokens


def round_weights(
    applied: Sequence[float], tokens: Sequence[int], gains: Sequence[float]
) -> list[float]:
    """The weights a round's updates end with: the total they were applied with, shared
    in proportion to n_i·g_i (each one's token count times its s(τ)·clip).

    K equally fast workers applied at 1/K each end with n_i/N, the weights of a FedAvg
    round; with a token count unknown (≤ 0) the shares follow the gains alone.
    """
    if not len(applied) == len(tokens) == len(gains):
        raise ValueError("a round needs as many token counts and gains as applied weights")
    counted = all(n > 0 for n in tokens)
    shares = [n * g for n, g in zip(tokens, gains, strict=True)] if counted else list(gains)
    mass = sum(shares)
    if not mass > 0:
        return list(applied)
    total = sum(applied)
    return [total * share / mass for share in shares]


def accumulate(
    buffer: Mapping[str, torch.Tensor] | None, delta: Mapping[str, torch.Tensor], coeff: float
) -> AdapterState:
    """buffer + coeff·Δ (a new dict; an empty buffer is ``None``)."""
    if buffer is None:
        return {key: coeff * value for key, value in delta.items()}
    return {key: buffer[key] + coeff * delta[key] for key in buffer}


def scale(state: Mapping[str, torch.Tensor], factor: float) -> AdapterState:
    """factor·state, tensor by tensor."""
    return {key: factor * value for key, value in state.items()}


def sgd_step(
    params: Mapping[str, torch.Tensor],
    grad: Mapping[str, torch.Tensor],
    lr: float,
    velocity: Mapping[str, torch.Tensor] | None,
    *,
    momentum: float,
    nesterov: bool,
) -> tuple[AdapterState, AdapterState | None]:
    """One server SGD step along the pseudo-gradient ``grad`` (a delta: θ moves *along* it).

    v ← μ·v + g; θ ← θ + lr·(g + μ·v) with Nesterov (DiLoCo's outer step), else θ + lr·v.
    Without momentum this is θ + lr·g and no velocity is kept.
    """
    if momentum == 0.0:
        return apply_update(params, grad, lr), None
    if velocity is None:
        velocity = {key: torch.zeros_like(value) for key, value in grad.items()}
    new_velocity = {key: momentum * velocity[key] + grad[key] for key in grad}
    if nesterov:
        step = {key: grad[key] + momentum * new_velocity[key] for key in grad}
    else:
        step = new_velocity
    return apply_update(params, step, lr), new_velocity


def adam_step(
    params: Mapping[str, torch.Tensor],
    grad: Mapping[str, torch.Tensor],
    lr: float,
    moments: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | None,
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[AdapterState, tuple[AdapterState, AdapterState]]:
    """FedAdam (Reddi et al. 2021): m ← β1·m + (1-β1)·g; v ← β2·v + (1-β2)·g²;
    θ ← θ + lr·m / (√v + ε), without bias correction as in the paper."""
    if moments is None:
        zeros = {key: torch.zeros_like(value) for key, value in grad.items()}
        moments = (zeros, dict(zeros))
    m_old, v_old = moments
    m = {key: beta1 * m_old[key] + (1.0 - beta1) * grad[key] for key in grad}
    v = {key: beta2 * v_old[key] + (1.0 - beta2) * grad[key] * grad[key] for key in grad}
    step = {key: m[key] / (v[key].sqrt() + eps) for key in grad}
    return apply_update(params, step, lr), (m, v)


# --- inner products over whole adapter states ------------------------------------------------


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """⟨a, b⟩ over all tensors taken together: one BLAS dot per tensor, summed as a float
    (no float64 copies: the update screen runs it on every update)."""
    return dots(a, b)[0]


def dots(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """(⟨a, b⟩, ⟨b, b⟩) in one pass over the tensors, each tensor's pair on one of two
    threads while its ``b`` is in cache; each sum in key order, as ``dot`` would make it."""

    def pair(key: str) -> tuple[float, float]:
        x, y = a[key].reshape(-1), b[key].reshape(-1)
        return float(torch.dot(x, y)), float(torch.dot(y, y))

    keys = list(a)
    pairs = per_tensor(pair, keys, [a[key].numel() for key in keys])
    return sum(ab for ab, _ in pairs.values()), sum(bb for _, bb in pairs.values())


def cosine(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], norm_a: float | None = None
) -> float:
    """cos(a, b) over all tensors taken together (0 when either is zero); ``norm_a``: ‖a‖
    when known already."""
    ab, bb = dots(a, b)
    norms = (global_norm(a) if norm_a is None else norm_a) * math.sqrt(max(bb, 0.0))
    return ab / norms if norms > 0 else 0.0
