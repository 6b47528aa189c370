"""Each expert's domain signature, kept durably beside its adapter.

A worker sends one :class:`~fedmoe.signature.DomainSignature` (an aggregate over at least
``min_count`` of its examples) after it registers. The book keeps each worker's latest
signature per expert and serves their count-weighted combination. Every accepted
signature is written to ``<state_dir>/signatures/<expert>.safetensors`` (temp file, fsync,
rename: ``fedmoe.adapters.atomic_write``) before it is acknowledged, so it survives a
kill -9 and a restart like the experts do.

File format: tensors ``<worker_id>/mean`` and ``<worker_id>/var`` (format 2 signatures
also ``<worker_id>/basis`` and ``<worker_id>/eigenvalues``) for each contributing worker;
metadata ``fedmoe_signatures`` = JSON ``{worker_id: {format, count, featurizer,
base_fingerprint[, subspace: {residual, quantiles}]}}``. Files written before format 2
(no ``format`` key, no subspace) load as format 1 signatures.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedmoe.adapters import atomic_write, read_header
from fedmoe.coordinator import errors
from fedmoe.featurizer import FeaturizerSettings
from fedmoe.ood import MAX_RANK
from fedmoe.routing import DEFAULT_METHOD
from fedmoe.signature import DomainSignature, SignatureError

logger = logging.getLogger(__name__)

METADATA_KEY = "fedmoe_signatures"
# Hidden size assumed for the body limit before the base model's is known (bare unit setups).
FALLBACK_HIDDEN = 4096


class InvalidSignatureError(errors.CoordinatorError):
    """A signature upload is malformed or does not fit this coordinator (HTTP 422)."""


class NoSignatureError(errors.CoordinatorError):
    """No worker has sent a signature for that expert yet (HTTP 404)."""


class SignatureBook:
    """Signatures per expert and worker; thread-safe; written before acknowledged."""

    def __init__(
        self,
        state_dir: Path,
        experts: Iterable[str],
        *,
        fingerprint: str,
        min_count: int,
        featurizer: FeaturizerSettings | None = None,
        hidden_size: int | None = None,
    ) -> None:
        self.directory = Path(state_dir) / "signatures"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint, self.min_count = fingerprint, min_count
        self.featurizer = featurizer or FeaturizerSettings()
        # The base model's; None only in bare unit setups, where the first accepted
        # signature fixes the dimension instead.
        self.hidden_size = hidden_size
        self._lock = threading.Lock()
        self._by_worker: dict[str, dict[str, DomainSignature]] = {}
        for name in experts:
            self._by_worker[name] = self._load(name)

    def body_limit(self) -> int:
        """Largest upload body a valid signature needs: mean, var and a full-rank subspace.

        JSON numbers take at most ~24 characters each; 32 leaves room for the separators.
        """
        hidden = self.hidden_size or self._known_dim() or FALLBACK_HIDDEN
        return 65536 + 32 * (2 + 2 * MAX_RANK) * hidden

    def path(self, expert: str) -> Path:
        """The file of one expert's signatures."""
        return self.directory / f"{expert}.safetensors"

    # --- start-up ----------------------------------------------------------------------

    def _load(self, expert: str) -> dict[str, DomainSignature]:
        path = self.path(expert)
        if not path.exists():
            return {}
        payload = path.read_bytes()
        try:
            signatures = decode_book(payload)
        except (SignatureError, SafetensorError, ValueError, KeyError) as error:
            raise errors.StateDirError(
                f"cannot restore the signatures of expert {expert} from {path}: {error}"
            ) from None
        fitting = {w: s for w, s in signatures.items() if not self._problems(s)}
        if len(fitting) < len(signatures):
            # Written under another featurizer version or base: stale, not corrupt. Kept
            # on disk until a worker sends a new one, never used for routing.
            logger.warning(
                "ignoring %d signature(s) of %s made with another featurizer or base model",
                len(signatures) - len(fitting),
                expert,
            )
        return fitting

    # --- validation and updates --------------------------------------------------------

    def _problems(self, signature: DomainSignature) -> list[str]:
        problems = []
        if signature.featurizer != self.featurizer:
            problems.append(
                f"featurizer {signature.featurizer.to_dict()} differs from this coordinator's "
                f"{self.featurizer.to_dict()}"
            )
        if signature.base_fingerprint != self.fingerprint:
            problems.append(
                f"base model fingerprint {signature.base_fingerprint} differs from "
                f"{self.fingerprint}"
            )
        if signature.count < self.min_count:
            problems.append(
                f"count {signature.count} is below the minimum of {self.min_count} examples"
            )
        dim = self.hidden_size or self._known_dim()
        if dim is not None and signature.dim != dim:
            problems.append(f"dimension {signature.dim} differs from the base model's {dim}")
        return problems

    def _known_dim(self) -> int | None:
        for signatures in self._by_worker.values():
            for signature in signatures.values():
                return signature.dim
        return None

    def validate(self, data: Mapping[str, Any]) -> DomainSignature:
        """Parse and check an uploaded signature; :class:`InvalidSignatureError` says why."""
        try:
            signature = DomainSignature.from_dict(dict(data))
        except SignatureError as error:
            raise InvalidSignatureError(f"invalid signature: {error}") from None
        problems = self._problems(signature)
        if problems:
            raise InvalidSignatureError("signature refused: " + "; ".join(problems))
        return signature

    def submit(self, expert: str, worker_id: str, signature: DomainSignature) -> dict[str, Any]:
        """Store ``worker_id``'s signature for ``expert`` (replacing its previous one)."""
        with self._lock:
            updated = {**self._by_worker[expert], worker_id: signature}
            atomic_write(self.path(expert), encode_book(updated))
            self._by_worker[expert] = updated
        combined = DomainSignature.combine(updated.values())
        logger.info(
            "signature of %s from %s (%d examples; %d in all)",
            expert,
            worker_id,
            signature.count,
            combined.count,
        )
        return {
            "expert": expert,
            "worker_id": worker_id,
            "count": signature.count,
            "expert_count": combined.count,
            "workers": sorted(updated),
        }

    # --- reads -------------------------------------------------------------------------

    def combined(self, expert: str) -> DomainSignature | None:
        """The expert's count-weighted signature over its workers, or None."""
        signatures = self._by_worker.get(expert) or {}
        return DomainSignature.combine(signatures.values()) if signatures else None

    def workers(self, expert: str) -> list[str]:
        """The workers whose signatures make up the expert's."""
        return sorted(self._by_worker.get(expert) or {})

    def all_combined(self) -> dict[str, DomainSignature]:
        """Every expert that has a signature, combined."""
        found = {name: self.combined(name) for name in self._by_worker}
        return {name: sig for name, sig in found.items() if sig is not None}


def encode_book(signatures: Mapping[str, DomainSignature]) -> bytes:
    """One safetensors file of several workers' signatures."""
    tensors = {}
    for worker, signature in signatures.items():
        for key, tensor in signature.tensors().items():
            tensors[f"{worker}/{key}"] = tensor
    meta = {worker: signature.metadata() for worker, signature in signatures.items()}
    return save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def decode_book(payload: bytes) -> dict[str, DomainSignature]:
    """Parse :func:`encode_book` output (our own file; safetensors, never unpickled)."""
    meta = json.loads(read_header(payload)["__metadata__"][METADATA_KEY])
    tensors = load_safetensors(payload)
    return {
        worker: DomainSignature.from_parts(
            info,
            {
                key.split("/", 1)[1]: tensor
                for key, tensor in tensors.items()
                if key.split("/", 1)[0] == worker
            },
        )
        for worker, info in meta.items()
    }


def submit_signature(
    coordinator: Any, expert: str, worker_id: str, data: Mapping[str, Any]
) -> dict[str, Any]:
    """Validate and store a worker's signature for ``expert`` (the worker must be its own)."""
    if expert not in coordinator.experts:
        raise errors.UnknownExpertError(
            f"unknown expert {expert!r}; this coordinator has {sorted(coordinator.experts)}"
        )
    coordinator.workers.check(worker_id, expert)  # registered, and for this expert
    book: SignatureBook = coordinator.signatures
    return book.submit(expert, worker_id, book.validate(data))


def router_options(settings: Any) -> dict[str, Any]:
    """The router's decision settings as this coordinator is configured (``Router`` kwargs)."""
    return {
        "method": DEFAULT_METHOD,
        "margin": settings.router_margin,
        "max_distance": settings.router_max_distance,
        "fallback": settings.router_fallback,
        "ood_factor": settings.router_ood_factor,
    }


def signatures_payload(coordinator: Any) -> dict[str, Any]:
    """``GET /v1/signatures``: all a router needs (``fedmoe.routing.router_from_payload``)."""
    book: SignatureBook = coordinator.signatures
    combined = book.all_combined()
    return {
        "featurizer": book.featurizer.to_dict(),
        "base_fingerprint": book.fingerprint,
        "min_count": book.min_count,
        "router": router_options(coordinator.settings),
        "signatures": {
            name: {**sig.to_dict(), "workers": book.workers(name)} for name, sig in combined.items()
        },
        "missing": [name for name in coordinator.settings.experts if name not in combined],
    }


def expert_signature(coordinator: Any, expert: str) -> dict[str, Any]:
    """``GET /v1/experts/{name}/signature``: the combined signature and its workers."""
    if expert not in coordinator.experts:
        raise errors.UnknownExpertError(
            f"unknown expert {expert!r}; this coordinator has {sorted(coordinator.experts)}"
        )
    book: SignatureBook = coordinator.signatures
    signature = book.combined(expert)
    if signature is None:
        raise NoSignatureError(
            f"expert {expert!r} has no domain signature yet: none of its workers has sent one"
        )
    return {**signature.to_dict(), "workers": book.workers(expert)}


def router_description(coordinator: Any) -> dict[str, Any]:
    """What ``GET /v1/gateway`` says about routing: settings, featurizer, coverage."""
    book: SignatureBook = coordinator.signatures
    combined = book.all_combined()
    return {
        "default": "routed" if combined else "merged",
        **router_options(coordinator.settings),
        "featurizer": book.featurizer.to_dict(),
        "experts": {
            name: {"count": sig.count, "format": sig.format, "workers": book.workers(name)}
            for name, sig in combined.items()
        },
        "missing": [name for name in coordinator.settings.experts if name not in combined],
    }
