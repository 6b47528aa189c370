"""Value objects the coordinator keeps: versioned adapters, lazy gateways, upload requests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from fedmoe import aggregate
from fedmoe.adapters import Buffer, encode_adapter, view_adapter
from fedmoe.aggregate import AdapterState
from fedmoe.coordinator.body_digest import body_digest
from fedmoe.state_digest import state_digest

if TYPE_CHECKING:
    from fedmoe.adapter_stream import Decoded

# The ledger sums token counts in SQLite INTEGERs (signed 64-bit); a trillion tokens per
# update is far beyond any sync interval yet leaves room for millions of updates in a sum.
MAX_NUM_TOKENS = 10**12

# The largest ε a worker may report: beyond it a DP guarantee means nothing anyway.
MAX_DP_EPSILON = 1e6

# Below this bound on |θ| + |w·Δ| a float32 sum cannot overflow (half the float32 max).
SAFE_ABS_BOUND = 1.7e38

# Below this bound on every expert's max|θ| no merge can overflow float32: cat and linear
# scale by normalised weights (<= 1), and an svd factor is at most sqrt(σ_max) <=
# sqrt(max|B|·max|A|·sqrt(numel(B)·numel(A))), under 3e38 for any adapter below 1e12
# elements a side. Above it the merge is computed and checked before the update commits.
GATEWAY_SAFE_BOUND = 1e30


class Versioned:
    """An expert at a version: float32 tensors, and their safetensors bytes made on demand.

    An update's acknowledgement waits only for the log (``fedmoe.coordinator.wal``), not
    for encoding the new expert: the bytes are encoded when first downloaded or snapshotted,
    and the tensors then become views of them, so one copy of each expert is held.
    """

    def __init__(
        self,
        version: int,
        state: AdapterState,
        abs_bound: float,
        payload: bytes | None = None,
        name: str = "",
    ) -> None:
        self.version, self.state, self.name = version, state, name
        # An upper bound of max|θ|: while it stays far below the float32 limit no update
        # can overflow, so the full finiteness scan of the new state is skipped.
        self.abs_bound = abs_bound
        self._payload = payload
        self._digest: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_payload(
        cls, version: int, payload: bytes, abs_bound: float | None = None, name: str = ""
    ) -> Versioned:
        """Wrap our own float32 safetensors bytes (``abs_bound`` computed when not given)."""
        state = view_adapter(payload)
        bound = aggregate.max_abs(state) if abs_bound is None else abs_bound
        return cls(version, state, bound, payload, name)

    @property
    def payload(self) -> bytes:
        """The float32 safetensors bytes (encoded once; the tensors then view them)."""
        with self._lock:
            if self._payload is None:
                metadata = {"name": self.name, "version": str(self.version)}
                self._payload = encode_adapter(self.state, metadata)
                self.state = view_adapter(self._payload)
            return self._payload

    @property
    def digest(self) -> str:
        """``state_digest`` of the tensors (computed once)."""
        with self._lock:
            if self._digest is None:
                self._digest = state_digest(self.state)
            return self._digest


class LazyGateway:
    """One gateway version: a snapshot of the experts, merged only when first needed.

    Every accepted update makes a new gateway version at once, but the merge (which
    for ``cat`` copies every expert) runs only when someone reads or saves it. Only
    the encoded bytes are kept: with many experts the merged tensors are large.
    """

    def __init__(
        self,
        version: int,
        built_from: dict[str, Any],
        sources: list[AdapterState],
        merge: Callable[[list[AdapterState]], AdapterState],
    ) -> None:
        self.version, self.extra = version, built_from
        self._sources, self._merge = sources, merge
        self._payload: bytes | None = None
        self._lock = threading.Lock()

    def encoded(self) -> bytes:
        """The merged adapter as safetensors bytes (merged and encoded once)."""
        with self._lock:
            if self._payload is None:
                merged = self._merge(self._sources)
                self._payload = encode_adapter(
                    merged, {"name": "gateway", "version": str(self.version)}
                )
                self._sources = []  # the experts' old versions can be freed now
            return self._payload


@dataclass(frozen=True)
class UpdateRequest:
    """One upload as the API layer hands it over (the body not yet parsed)."""

    expert: str
    worker_id: str
    update_id: str
    base_version: int
    num_tokens: int
    train_loss: float | None
    body: Buffer  # as received: the API layer's receive buffer (read only), not a copy
    dp_epsilon: float | None = None  # privacy the sender reports spent (example-level DP)
    final: bool = False  # the sender's last upload: it is stopping (no longer active)
    # What the API layer computes from the body as it comes in, handed over unfinished (the
    # update path asks for each only when it needs it, so its log write starts meanwhile): the
    # body's digest (``body_digest``), and its float32 tensors and norm as
    # ``adapters.decode_with_norm`` gives them (result None: decode again; ``decoding`` None:
    # the layout is unchecked).
    hashing: Future[str] | None = field(default=None, repr=False, compare=False)
    decoding: Future[Decoded | None] | None = field(default=None, repr=False, compare=False)

    @cached_property
    def body_blake3(self) -> str:
        """The digest kept with the update id: a reused id with another body is refused."""
        if self.hashing is not None:
            return self.hashing.result()
        return body_digest(self.body)

    def decoded(self) -> Decoded | None:
        """The tensors and norm the API layer decoded (waiting for them), or None."""
        return self.decoding.result() if self.decoding is not None else None
