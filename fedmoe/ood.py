"""Out-of-domain statistics of a domain signature: a low-rank model of its feature spread.

A signature's per-dimension variance cannot tell a foreign domain from its own when the
domain is broad: on the demo's data the docs domain's diagonal Gaussian holds the python
prompts as closely as its own (``benchmarks/RESULTS.md``, routing). What separates them is
the *shape* of the spread: a domain's unit features lie near a few directions. A
:class:`Subspace` keeps the top ``rank`` principal directions of the domain's features,
their variances, the mean variance left off them, and quantiles of the domain's own
distances (:func:`Subspace.distance`, a probabilistic-PCA Mahalanobis distance per
dimension), so a router can send a request that lies far outside every expert's domain to
the fallback with a per-expert threshold the worker calibrated on its own data.

Only aggregates: ``rank`` directions of the covariance of at least ``min_count`` examples
(the same order of information as the variance), their variances and three quantiles.
Optional Gaussian noise perturbs the directions (re-orthonormalised), the variances and
the residual before anything is shared.

Public API::

    sub = Subspace.fit(features, mean)        # features [n, hidden] unit rows, mean [hidden]
    sub.distance(features, mean)              # [n]; about the in-domain quantiles inside
    sub.threshold                             # the in-domain 99th percentile of distance
    Subspace.combine([(count, mean, sub), ...], pooled_mean)
    sub.to_dict() / Subspace.from_dict(data)  # JSON (SignatureError on bad input)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Signature formats: 1 = mean, var, count; 2 = also the out-of-domain subspace.
SIGNATURE_FORMAT = 2
# Principal directions kept; enough for the demo's domains (measured: 8 is not, 16 is),
# small beside the mean for real hidden sizes (16 x 896 floats for Qwen2.5-0.5B).
DEFAULT_RANK = 16
MAX_RANK = 64
# Quantiles of the in-domain distance a worker reports; the router's threshold is the last.
QUANTILE_LEVELS = (0.5, 0.9, 0.99)
# Variance floor, times 1/hidden (unit features spread ~1/hidden per dimension): a
# templated domain whose prefixes are all alike must not get a zero-width model.
VAR_FLOOR = 0.01
# Bounds of what a valid subspace may carry (unit features: no variance can exceed 1).
MAX_VARIANCE = 4.0
MAX_QUANTILE = 1e6
ORTHONORMAL_TOLERANCE = 1e-3


class SubspaceError(ValueError):
    """Malformed out-of-domain statistics (shape, range, orthonormality)."""


@dataclass(frozen=True)
class Subspace:
    """Top principal directions of a domain's unit features, and its distance quantiles."""

    basis: torch.Tensor  # [rank, hidden], orthonormal rows
    eigenvalues: torch.Tensor  # [rank], variance along each row of basis
    residual: float  # mean variance per dimension off the subspace
    quantiles: tuple[float, ...]  # in-domain distance at QUANTILE_LEVELS

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`SubspaceError` unless shapes, ranges and orthonormality hold."""
        if self.basis.ndim != 2 or not 1 <= self.basis.shape[0] <= MAX_RANK:
            raise SubspaceError(
                f"basis must be [rank, hidden] with 1 <= rank <= {MAX_RANK}, "
                f"got {tuple(self.basis.shape)}"
            )
        if tuple(self.eigenvalues.shape) != (self.basis.shape[0],):
            raise SubspaceError(
                f"eigenvalues have shape {tuple(self.eigenvalues.shape)}, "
                f"basis has rank {self.basis.shape[0]}"
            )
        for name, tensor in (("basis", self.basis), ("eigenvalues", self.eigenvalues)):
            if not bool(torch.isfinite(tensor).all()):
                raise SubspaceError(f"{name} holds NaN or Inf")
        if bool((self.eigenvalues < 0).any()) or bool((self.eigenvalues > MAX_VARIANCE).any()):
            raise SubspaceError(f"eigenvalues must lie in [0, {MAX_VARIANCE}]")
        if not (math.isfinite(self.residual) and 0 <= self.residual <= MAX_VARIANCE):
            raise SubspaceError(f"residual must lie in [0, {MAX_VARIANCE}], got {self.residual}")
        self._check_quantiles()
        gram = self.basis.double() @ self.basis.double().T
        if float((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max()) > (
            ORTHONORMAL_TOLERANCE
        ):
            raise SubspaceError("basis rows are not orthonormal")

    def _check_quantiles(self) -> None:
        values = self.quantiles
        if len(values) != len(QUANTILE_LEVELS):
            raise SubspaceError(
                f"quantiles must hold {len(QUANTILE_LEVELS)} values (levels {QUANTILE_LEVELS}),"
                f" got {len(values)}"
            )
        if not all(math.isfinite(v) and 0 <= v <= MAX_QUANTILE for v in values):
            raise SubspaceError(f"quantiles must lie in [0, {MAX_QUANTILE:g}]")
        if any(b < a for a, b in itertools.pairwise(values)):
            raise SubspaceError("quantiles must not decrease")

    @property
    def rank(self) -> int:
        """How many principal directions are kept."""
        return int(self.basis.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return int(self.basis.shape[1])

    @property
    def threshold(self) -> float:
        """The in-domain 99th percentile of :meth:`distance` (what the router scales)."""
        return self.quantiles[-1]

    # --- fitting and distance ------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        mean: torch.Tensor,
        *,
        rank: int = DEFAULT_RANK,
        noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Subspace:
        """Fit on unit features ``[n, hidden]`` centred on ``mean`` (the signature's mean).

        The quantiles are of the features' own distances under the fitted (noised) model.
        """
        x = features.double() - mean.double()
        n, hidden = x.shape
        rank = max(1, min(rank, hidden - 1, n - 1))
        _, singular, vh = torch.linalg.svd(x, full_matrices=False)
        variances = singular**2 / max(n - 1, 1)
        total = float(x.pow(2).sum()) / max(n - 1, 1)
        basis, eigenvalues = vh[:rank], variances[:rank]
        residual = max(total - float(eigenvalues.sum()), 0.0) / max(hidden - rank, 1)
        if noise > 0:
            basis, eigenvalues, residual = _noised(basis, eigenvalues, residual, noise, generator)
        draft = cls(basis.float(), eigenvalues.float(), residual, (0.0,) * len(QUANTILE_LEVELS))
        distances = draft.distance(features, mean)
        levels = torch.tensor(QUANTILE_LEVELS, dtype=torch.float64)
        quantiles = torch.quantile(distances, levels).clamp(0, MAX_QUANTILE)
        return cls(draft.basis, draft.eigenvalues, residual, tuple(quantiles.tolist()))

    def distance(self, features: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance per dimension ``[n]`` of ``[n, hidden]`` (or ``[hidden]``).

        Squared standardised coordinates along each principal direction, plus the squared
        remainder over the residual variance, divided by ``hidden``.
        """
        x = features.reshape(1, -1) if features.ndim == 1 else features
        diff = x.double() - mean.double()
        floor = VAR_FLOOR / self.dim
        residual = max(self.residual, floor)
        along = diff @ self.basis.double().T
        variances = self.eigenvalues.double().clamp_min(residual)
        off = (diff.pow(2).sum(-1) - along.pow(2).sum(-1)).clamp_min(0.0)
        return ((along.pow(2) / variances).sum(-1) + off / residual) / self.dim

    # --- combining -----------------------------------------------------------------------

    @staticmethod
    def combine(
        parts: Sequence[tuple[int, torch.Tensor, Subspace]], mean: torch.Tensor
    ) -> Subspace:
        """Pool several workers' subspaces (count, their mean, subspace) around ``mean``.

        Each part stands for the covariance ``B^T (L - s) B + s I`` (its residual ``s``
        everywhere off its directions); the pooled covariance adds the spread of the
        workers' means, and is truncated back to the largest rank among the parts, the
        variance dropped going to the residual. Quantiles are count-weighted means: an
        approximation, as each worker measured its own distances under its own model.
        """
        total = sum(count for count, _, _ in parts)
        hidden = parts[0][2].dim
        residual = sum(count * sub.residual for count, _, sub in parts) / total
        factors = []
        for count, part_mean, sub in parts:
            weight = count / total
            excess = (sub.eigenvalues.double() - sub.residual).clamp_min(0.0)
            factors.append(sub.basis.double().T * (weight * excess).sqrt())
            factors.append((math.sqrt(weight) * (part_mean.double() - mean.double()))[:, None])
        _, singular, vh = torch.linalg.svd(torch.cat(factors, dim=1).T, full_matrices=False)
        rank = min(max(sub.rank for _, _, sub in parts), vh.shape[0])
        excess = singular**2
        dropped = float(excess[rank:].sum())
        residual += dropped / max(hidden - rank, 1)
        quantiles = [
            sum(count * sub.quantiles[i] for count, _, sub in parts) / total
            for i in range(len(QUANTILE_LEVELS))
        ]
        eigenvalues = (excess[:rank] + residual).clamp_max(MAX_VARIANCE)
        return Subspace(vh[:rank].float(), eigenvalues.float(), residual, tuple(quantiles))

    # --- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "basis": self.basis.tolist(),
            "eigenvalues": self.eigenvalues.tolist(),
            "residual": self.residual,
            "quantiles": list(self.quantiles),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Subspace:
        """Parse :meth:`to_dict` output (tensors accepted in place of lists)."""
        try:
            basis = _tensor(data["basis"], "basis")
            eigenvalues = _tensor(data["eigenvalues"], "eigenvalues")
            residual = _number(data["residual"], "residual")
            quantiles = data["quantiles"]
            if not isinstance(quantiles, (list, tuple)):
                raise SubspaceError("quantiles must be a list of numbers")
            values = tuple(_number(v, "quantiles") for v in quantiles)
        except KeyError as missing:
            raise SubspaceError(f"subspace lacks {missing}") from None
        return cls(basis, eigenvalues, residual, values)


def parse_subspace(data: Mapping[str, Any]) -> Subspace | None:
    """The subspace of a signature's JSON: None for format 1 (absent, or null)."""
    found = data.get("subspace")
    declared = data.get("format")
    if declared is not None and declared not in (1, SIGNATURE_FORMAT):
        raise SubspaceError(f"unknown signature format {declared!r}")
    if found is None:
        if declared == SIGNATURE_FORMAT:
            raise SubspaceError("a format 2 signature needs its subspace")
        return None
    if not isinstance(found, dict):
        raise SubspaceError("subspace must be an object")
    return Subspace.from_dict(found)


def pool_subspaces(
    parts: Sequence[tuple[int, torch.Tensor, Subspace | None]], mean: torch.Tensor
) -> Subspace | None:
    """The pooled subspace of (count, mean, subspace) parts; None if any part has none."""
    present = [(count, m, sub) for count, m, sub in parts if sub is not None]
    if not present or len(present) < len(parts):
        return None  # a format 1 part: nothing to pool it with
    if len(present) == 1:
        return present[0][2]
    return Subspace.combine(present, mean)


def _noised(
    basis: torch.Tensor,
    eigenvalues: torch.Tensor,
    residual: float,
    noise: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Gaussian noise on every shared number; the basis re-orthonormalised (QR)."""

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return noise * torch.randn(shape, generator=generator, dtype=torch.float64)

    noisy = basis + draw(tuple(basis.shape))
    q, r = torch.linalg.qr(noisy.T)
    basis = (q * torch.sign(torch.diagonal(r))).T  # keep each row's orientation
    eigenvalues = (eigenvalues + draw(tuple(eigenvalues.shape))).clamp(0.0, MAX_VARIANCE)
    residual = min(max(residual + float(draw((1,))[0]), 0.0), MAX_VARIANCE)
    return basis, eigenvalues, residual


def _tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu()
    try:
        tensor = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise SubspaceError(f"{name} must be numbers in a regular shape: {error}") from None
    return tensor


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SubspaceError(f"{name} must be numbers, got {value!r}")
    return float(value)
