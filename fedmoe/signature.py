"""Domain signatures: the aggregate of one domain's features that a worker shares.

Requests and training examples are featurized by the frozen, versioned featurizer of
``fedmoe.featurizer`` (base model only, unit length). A :class:`DomainSignature` is the
aggregate of those unit features over at least ``min_count`` examples of one domain: their
mean, their per-dimension variance and their count, stamped with the featurizer version and
settings and the base model's fingerprint. Per-example features never leave this module's
caller.

Format 2 signatures also carry a :class:`fedmoe.ood.Subspace` (the top principal
directions of the features, their variances and the domain's own distance quantiles), from
which the router tells a request no expert knows from one it does. Format 1 signatures
(older workers) lack it and still load: the router then bounds their domain by the
diagonal distance only, and says so in its log.

Signatures combine exactly (:meth:`DomainSignature.combine`, count-weighted mean and
pooled variance; the subspaces up to truncation) and travel as JSON (:meth:`to_dict`) or
safetensors (:meth:`to_safetensors`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedmoe.data import Example
from fedmoe.featurizer import FeaturizerSettings, featurize, request_text
from fedmoe.fields import DEFAULT_SIGNATURE_MIN_COUNT
from fedmoe.ood import DEFAULT_RANK, Subspace, parse_subspace, pool_subspaces

DEFAULT_MIN_COUNT = DEFAULT_SIGNATURE_MIN_COUNT


class SignatureError(ValueError):
    """A signature is malformed or does not fit (shape, finite, count, version, base)."""


@dataclass(frozen=True)
class DomainSignature:
    """The aggregate of one domain's unit features: mean, per-dimension variance, count."""

    mean: torch.Tensor
    var: torch.Tensor
    count: int
    featurizer: FeaturizerSettings
    base_fingerprint: str
    subspace: Subspace | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`SignatureError` unless shapes, values and count are sane."""
        if self.mean.ndim != 1 or self.mean.numel() == 0:
            raise SignatureError(f"mean must be a non-empty vector, got shape {self.shape_of()}")
        if tuple(self.var.shape) != tuple(self.mean.shape):
            raise SignatureError(
                f"var has shape {tuple(self.var.shape)}, mean {tuple(self.mean.shape)}"
            )
        for name, tensor in (("mean", self.mean), ("var", self.var)):
            if not bool(torch.isfinite(tensor).all()):
                raise SignatureError(f"{name} holds NaN or Inf")
        if bool((self.var < 0).any()):
            raise SignatureError("var holds negative values")
        if self.count < 1:
            raise SignatureError(f"count must be >= 1, got {self.count}")
        if self.subspace is not None and self.subspace.dim != self.dim:
            raise SignatureError(f"subspace has dimension {self.subspace.dim}, the mean {self.dim}")

    @property
    def format(self) -> int:
        """1 without out-of-domain statistics (an older worker's), 2 with them."""
        return 1 if self.subspace is None else 2

    def shape_of(self) -> tuple[int, ...]:
        """The mean's shape (for messages)."""
        return tuple(self.mean.shape)

    @property
    def dim(self) -> int:
        """Feature dimension (the base model's hidden size)."""
        return int(self.mean.numel())

    @classmethod
    def from_features(
        cls,
        features: torch.Tensor,
        featurizer: FeaturizerSettings,
        base_fingerprint: str,
        *,
        min_count: int = DEFAULT_MIN_COUNT,
        noise: float = 0.0,
        generator: torch.Generator | None = None,
        rank: int = DEFAULT_RANK,
    ) -> DomainSignature:
        """Aggregate unit features (refusing fewer than ``min_count``), optionally noised.

        ``noise`` is the standard deviation of Gaussian noise added to each coordinate of
        the mean (and of the second moment, and of the subspace) before anything is shared.
        ``rank`` 0 leaves out the subspace (a format 1 signature, as older workers send).
        """
        count = int(features.shape[0])
        if count < min_count:
            raise SignatureError(
                f"a domain signature needs at least {min_count} examples, got {count}; "
                "use a larger dataset (fewer would reveal too much about single examples)"
            )
        x = features.double()
        mean, second = x.mean(dim=0), (x * x).mean(dim=0)
        if noise > 0:
            mean = mean + noise * torch.randn(mean.shape, generator=generator, dtype=x.dtype)
            second = second + noise * torch.randn(mean.shape, generator=generator, dtype=x.dtype)
        var = (second - mean * mean).clamp_min(0.0)
        subspace = (
            Subspace.fit(features, mean.float(), rank=rank, noise=noise, generator=generator)
            if rank > 0
            else None
        )
        return cls(mean.float(), var.float(), count, featurizer, base_fingerprint, subspace)

    def compatible_with(self, other: DomainSignature) -> list[str]:
        """What differs between two signatures' featurizer, base and shape (empty if none)."""
        problems = []
        if self.featurizer != other.featurizer:
            problems.append(
                f"featurizer {other.featurizer.to_dict()} differs from {self.featurizer.to_dict()}"
            )
        if self.base_fingerprint != other.base_fingerprint:
            problems.append(
                f"base fingerprint {other.base_fingerprint} differs from {self.base_fingerprint}"
            )
        if self.shape_of() != other.shape_of():
            problems.append(f"shape {other.shape_of()} differs from {self.shape_of()}")
        return problems

    @staticmethod
    def combine(signatures: Iterable[DomainSignature]) -> DomainSignature:
        """The exact count-weighted combination (pooled mean and variance)."""
        items = list(signatures)
        if not items:
            raise SignatureError("nothing to combine")
        for other in items[1:]:
            problems = items[0].compatible_with(other)
            if problems:
                raise SignatureError("; ".join(problems))
        total = sum(s.count for s in items)
        counts = torch.tensor([float(s.count) for s in items], dtype=torch.float64)[:, None]
        means = torch.stack([s.mean.double() for s in items])
        variances = torch.stack([s.var.double() for s in items])
        mean = (counts * means).sum(0) / total
        second = (counts * (variances + means * means)).sum(0) / total
        var = (second - mean * mean).clamp_min(0.0)
        first = items[0]
        subspace = pool_subspaces([(s.count, s.mean, s.subspace) for s in items], mean.float())
        return DomainSignature(
            mean.float(), var.float(), total, first.featurizer, first.base_fingerprint, subspace
        )

    # --- serialisation -----------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors."""
        meta: dict[str, Any] = {
            "format": self.format,
            "count": self.count,
            "featurizer": self.featurizer.to_dict(),
            "base_fingerprint": self.base_fingerprint,
        }
        if self.subspace is not None:
            meta["subspace"] = {
                "residual": self.subspace.residual,
                "quantiles": list(self.subspace.quantiles),
            }
        return meta

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors (for safetensors files): mean, var and the subspace's, if any."""
        found = {"mean": self.mean.contiguous(), "var": self.var.contiguous()}
        if self.subspace is not None:
            found["basis"] = self.subspace.basis.contiguous()
            found["eigenvalues"] = self.subspace.eigenvalues.contiguous()
        return found

    @classmethod
    def from_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> DomainSignature:
        """Inverse of (:meth:`metadata`, :meth:`tensors`)."""
        data = {**meta, "mean": tensors["mean"], "var": tensors["var"]}
        if "subspace" in meta:
            data["subspace"] = {
                **meta["subspace"],
                "basis": tensors["basis"],
                "eigenvalues": tensors["eigenvalues"],
            }
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (floats in full precision)."""
        data = {**self.metadata(), "mean": self.mean.tolist(), "var": self.var.tolist()}
        if self.subspace is not None:
            data["subspace"] = self.subspace.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DomainSignature:
        """Parse :meth:`to_dict` output; :class:`SignatureError` names what is wrong."""
        try:
            mean = _vector(data["mean"], "mean")
            var = _vector(data["var"], "var")
            count = data["count"]
            if not isinstance(count, int) or isinstance(count, bool):
                raise SignatureError(f"count must be an integer, got {count!r}")
            featurizer = FeaturizerSettings.from_dict(dict(data["featurizer"]))
            fingerprint = str(data["base_fingerprint"])
            subspace = parse_subspace(data)
        except KeyError as missing:
            raise SignatureError(f"signature lacks {missing}") from None
        except (TypeError, ValueError) as error:
            if isinstance(error, SignatureError):
                raise
            raise SignatureError(f"invalid signature: {error}") from None
        return cls(mean, var, count, featurizer, fingerprint, subspace)

    def to_safetensors(self) -> bytes:
        """Safetensors bytes: tensors ``mean``, ``var``; the rest as JSON metadata."""
        return save_safetensors(
            self.tensors(),
            metadata={"fedmoe_signature": json.dumps(self.metadata(), sort_keys=True)},
        )

    @classmethod
    def from_safetensors(cls, payload: bytes) -> DomainSignature:
        """Parse :meth:`to_safetensors` output."""
        try:
            tensors = load_safetensors(payload)
            header_len = int.from_bytes(payload[:8], "little")
            header = json.loads(payload[8 : 8 + header_len])
            meta = json.loads(header["__metadata__"]["fedmoe_signature"])
        except Exception as error:  # safetensors raises its own types
            raise SignatureError(f"not a signature file: {error}") from None
        try:
            return cls.from_parts(meta, tensors)
        except KeyError as missing:
            raise SignatureError(f"signature file lacks {missing}") from None


def _vector(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().reshape(-1) if value.ndim <= 1 else value.float()
    if not isinstance(value, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise SignatureError(f"{name} must be a list of numbers")
    if not all(math.isfinite(float(v)) for v in value):
        raise SignatureError(f"{name} holds NaN or Inf")
    return torch.tensor(value, dtype=torch.float32)


def compute_signature(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    featurizer: FeaturizerSettings,
    base_fingerprint: str,
    *,
    min_count: int = DEFAULT_MIN_COUNT,
    noise: float = 0.0,
    seed: int | None = None,
    rank: int = DEFAULT_RANK,
) -> DomainSignature:
    """A domain's signature from its examples (the request text of each, base model only)."""
    if len(examples) < min_count:
        raise SignatureError(
            f"a domain signature needs at least {min_count} examples, got {len(examples)}"
        )
    texts = [request_text(example, tokenizer) for example in examples]
    features = featurize(model, tokenizer, texts, featurizer)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DomainSignature.from_features(
        features,
        featurizer,
        base_fingerprint,
        min_count=min_count,
        noise=noise,
        generator=generator,
        rank=rank,
    )
