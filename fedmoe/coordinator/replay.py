"""Replaying log records: the same strategy calls on the same inputs, so the same floats.

A log record holds everything the live apply used that is not the expert itself: the
body as received, the contribution's scalars (staleness decay, clip, token factor,
active workers, the clock, and for FedAvg rounds its base version, staleness, tokens and
the round's updates still to come), the learning rate of a timed flush, and the full
description of the strategy that applied it. Replay rebuilds that strategy and calls
``receive`` / ``apply`` exactly as the live path did: the float32 result is bit for bit
the one the coordinator acknowledged, whatever the settings are now.

``accepted_deltas`` is the library view of the same log: an expert's accepted uploads
in order with their ledger rows (for rebuilding an expert without one worker's updates).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from fedmoe import aggregate
from fedmoe.adapters import AdapterSchema, decode_adapter
from fedmoe.aggregate import AdapterState
from fedmoe.coordinator.ledger_rows import UpdateRecord
from fedmoe.coordinator.rebuilt import decode_rebuilt
from fedmoe.coordinator.versions import Versioned
from fedmoe.coordinator.wal import ExpertLog, LogRecord
from fedmoe.robust_strategy import RobustBuffStrategy, RobustOptions
from fedmoe.screen_strategy import ScreenedAsyncStrategy, ScreenOptions
from fedmoe.server_strategy import (
    AsyncStrategy,
    Contribution,
    FedBuffStrategy,
    ServerOptimizer,
    Strategy,
    StrategyState,
)

# (a record written before a field was logged gets its default: typical_decay 1.0, and
# round_left 0, which no round waits on, so such a record replays as it was applied)
CONTRIBUTION_FIELDS = (
    "decay",
    "clip",
    "token_factor",
    "active_workers",
    "now",
    "typical_decay",
    "round_left",
    "base_version",
    "staleness",
    "num_tokens",
)


def replay_description(strategy: Strategy) -> dict[str, Any]:
    """Every constructor argument of ``strategy``: enough to rebuild it exactly."""
    optimizer = strategy.optimizer
    description: dict[str, Any] = {
        "strategy": strategy.name,
        "optimizer": optimizer.kind,
        "momentum": optimizer.momentum,
        "eps": optimizer.eps,
        "server_lr": strategy.server_lr,
    }
    if isinstance(strategy, FedBuffStrategy):
        description |= {"buffer_size": strategy.buffer_size, "timeout": strategy.timeout}
    if isinstance(strategy, RobustBuffStrategy):
        description["robust"] = asdict(strategy.robust)
    if isinstance(strategy, ScreenedAsyncStrategy):
        description["screen"] = asdict(strategy.screen)
    if isinstance(strategy, AsyncStrategy) and strategy.rounds:
        description["rounds"] = True
    return description


def strategy_from(description: dict[str, Any]) -> Strategy:
    """The strategy ``replay_description`` describes."""
    optimizer = ServerOptimizer(
        kind=description["optimizer"], momentum=description["momentum"], eps=description["eps"]
    )
    if "robust" in description:
        return RobustBuffStrategy(
            optimizer=optimizer,
            robust=RobustOptions(**description["robust"]),
            server_lr=description["server_lr"],
            buffer_size=description["buffer_size"],
            timeout=description["timeout"],
        )
    if description["strategy"] == "fedbuff":
        return FedBuffStrategy(
            optimizer=optimizer,
            server_lr=description["server_lr"],
            buffer_size=description["buffer_size"],
            timeout=description["timeout"],
        )
    rounds = bool(description.get("rounds", False))  # absent: written before rounds were
    if description.get("screen") is not None:
        return ScreenedAsyncStrategy(
            optimizer=optimizer,
            screen=ScreenOptions(**description["screen"]),
            server_lr=description["server_lr"],
            rounds=rounds,
        )
    return AsyncStrategy(optimizer=optimizer, server_lr=description["server_lr"], rounds=rounds)


def contribution_fields(contribution: Contribution) -> dict[str, Any]:
    """The scalars of a contribution, for its log record."""
    return {name: getattr(contribution, name) for name in CONTRIBUTION_FIELDS}


@dataclass
class Head:
    """An expert as replay leaves it: parameters, strategy state, last lsn applied."""

    expert: Versioned
    state: StrategyState
    lsn: int


def replay(head: Head, record: LogRecord, schema: AdapterSchema, name: str) -> Head:
    """``head`` after one record, computed as the live coordinator computed it."""
    header = record.header
    if header["kind"] == "forget":  # a rebuild without removed workers: its result, as is
        params, state = decode_rebuilt(record.body, schema)
        return Head(_versioned(params, int(header["version"]), name), state, record.lsn)
    strategy = strategy_from(header["strategy"])
    if header["kind"] == "flush":
        assert isinstance(strategy, FedBuffStrategy), "only a buffer is flushed"
        params, state = strategy.apply(head.expert.state, head.state, float(header["lr"]))
        return Head(_versioned(params, int(header["version"]), name), state, record.lsn)
    update_id = header["ledger"]["update_id"]
    delta = decode_adapter(record.body, schema)
    ledger = header["ledger"]  # who sent it, and ‖Δ‖ exactly as the live path computed it
    contribution = Contribution(
        update_id=update_id,
        delta=delta,
        worker_id=str(ledger["worker_id"]),
        norm=float(ledger["update_norm"]),
        **header["contribution"],
    )
    outcome = strategy.receive(head.expert.state, contribution, head.state)
    if outcome.params is None:
        return Head(head.expert, outcome.state, record.lsn)
    expert = _versioned(outcome.params, int(header["version"]), name)
    return Head(expert, outcome.state, record.lsn)


def _versioned(params: AdapterState, version: int, name: str) -> Versioned:
    return Versioned(version, params, aggregate.max_abs(params), name=name)


def ledger_fields(record: UpdateRecord) -> dict[str, Any]:
    """An update's ledger row as JSON-ready values (its acknowledgement is remade from them)."""
    values = asdict(record)
    del values["response"], values["state_sha256"]
    return values


def ledger_record(header: dict[str, Any]) -> UpdateRecord:
    """The ledger row a log record carries (for a row the crash kept out of SQLite), without
    its acknowledgement and digest."""
    return UpdateRecord(**header["ledger"])


@dataclass(frozen=True)
class AcceptedDelta:
    """One accepted upload of an expert: its ledger row and the delta as received."""

    lsn: int
    row: UpdateRecord
    delta: AdapterState  # float32, decoded from the body exactly as the coordinator did
    body: bytes
    applied: bool  # False: it went into a FedBuff buffer (applied with a later record)


def accepted_deltas(log: ExpertLog, schema: AdapterSchema) -> Iterator[AcceptedDelta]:
    """Every accepted upload of the expert whose log ``log`` is, in the order applied.

    Reads the archived segments, then the live ones; forgotten workers' purged uploads are
    left out. With ``delta_retention=drop`` the
    oldest deltas are gone: the first lsn seen is then > 1 and a ``ValueError`` says so.
    """
    expected = 1
    for record in log.all_records():
        if record.lsn != expected:
            raise ValueError(
                f"the log of {log.directory.name} starts at lsn {record.lsn}, not {expected}: "
                "older deltas were dropped (delta_retention=drop) or are damaged"
            )
        expected += 1
        if record.header["kind"] != "update" or record.header.get("purged"):
            continue  # a purged body was a forgotten worker's (fedmoe.coordinator.purge)
        yield AcceptedDelta(
            lsn=record.lsn,
            row=ledger_record(record.header),
            delta=decode_adapter(record.body, schema),
            body=record.body,
            applied=bool(record.header["applied"]),
        )


__all__ = [
    "AcceptedDelta",
    "Head",
    "accepted_deltas",
    "contribution_fields",
    "ledger_fields",
    "ledger_record",
    "replay",
    "replay_description",
    "strategy_from",
]
