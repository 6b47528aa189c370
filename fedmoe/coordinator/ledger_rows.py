"""The ledger's rows as the coordinator passes them around: an update's record (and the
acknowledgement made from it), who is active on an expert, and the rows that say which
strategy state and snapshot files are current (``fedmoe.coordinator.ledger``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedmoe.schemas import UpdateAck


@dataclass
class UpdateRecord:
    """One row of the ledger: an accepted or policy-rejected update."""

    update_id: str
    worker_id: str
    expert: str
    base_version: int
    staleness: int
    weight: float
    update_norm: float
    clipped: bool
    train_loss: float | None
    num_tokens: int
    accepted: bool
    reason: str | None = None
    expert_version: int | None = None
    gateway_version: int | None = None
    response: UpdateAck | None = None
    body_blake3: str | None = None  # ``body_digest``
    body_sha256: str | None = None  # rows logged before BLAKE3 (replay reads them back)
    buffered: bool = False
    buffer_fill: int = 0
    state_sha256: str | None = None  # the new expert's digest, when its sender can use it
    active_workers: int = 1  # K, as the update's weight counted them
    settle_version: int | None = None  # the version at which this update's round is in
    dp_epsilon: float | None = None  # the sender's spent ε, as reported
    final: bool = False  # the sender said it was its last upload (it is stopping)

    def acknowledgement(self) -> UpdateAck:
        """The answer to the worker that sent this (accepted) update: every field the
        acknowledgement shares with this row, and ``version``, the expert version it made."""
        assert self.expert_version is not None and self.gateway_version is not None
        shared = {key: value for key, value in vars(self).items() if key in UpdateAck.model_fields}
        return UpdateAck(**shared, version=self.expert_version, replayed=False)


@dataclass(frozen=True)
class Activity:
    """Who is active on an expert (``Ledger.recent_activity``) and what they sent."""

    workers: frozenset[str] = frozenset()
    tokens: tuple[int, ...] = ()  # the known (> 0) token counts of their recent updates
    newest: dict[str, int] = field(default_factory=dict)  # the version each newest made

    def yet_to_send(self, since_version: int, *, besides: str) -> int:
        """Active workers other than ``besides`` with no update applied after
        ``since_version``: the updates of the round that starts there still to come."""
        others = self.workers - {besides}
        return sum(1 for w in others if self.newest.get(w, -1) <= since_version)


@dataclass(frozen=True)
class StrategyRow:
    """Which strategy state file of an expert is current (``seq``) and what it holds."""

    expert: str
    seq: int
    strategy: str  # JSON description of the strategy that wrote it
    buffer_fill: int
    steps: int


@dataclass(frozen=True)
class SnapshotRow:
    """An expert's newest durable snapshot: the version of its adapter file, the last log
    record it includes (``lsn``), the strategy that wrote its state and whether it has one."""

    expert: str
    lsn: int
    version: int
    strategy: str
    has_state: bool


@dataclass(frozen=True)
class AcceptedUpdate:
    """Who sent an accepted update id, the answer they got and the digest of its body."""

    worker_id: str
    expert: str
    response: UpdateAck
    body_blake3: str | None
    body_sha256: str | None  # rows written before BLAKE3
