"""Federated evaluation reports: validated, stored durably beside the ledger, queried.

Workers evaluate the models on their own validation data and send only aggregate
numbers (loss per target token, token and example counts). Each report row records
the expert and gateway versions it was measured on. The rows live in the
``evaluations`` table of the coordinator's SQLite database (its own connection, WAL,
``synchronous=FULL``), next to the update ledger, whose history this module also
reads for the dashboard (train losses, staleness, refusals by policy).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmoe.coordinator import errors
from fedmoe.coordinator.database import Database
from fedmoe.coordinator.versions import MAX_NUM_TOKENS

if TYPE_CHECKING:
    from fedmoe.coordinator.core import CentralCoordinator

EVAL_KINDS = ("expert", "gateway", "routed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL, worker_id TEXT NOT NULL,
    expert TEXT NOT NULL, kind TEXT NOT NULL, loss REAL NOT NULL, tokens INTEGER NOT NULL,
    examples INTEGER NOT NULL, expert_version INTEGER NOT NULL, gateway_version INTEGER NOT NULL,
    routing_accuracy REAL, final INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS evaluations_time ON evaluations(created_at);
"""
COLUMNS = (
    "seq",
    "created_at",
    "worker_id",
    "expert",
    "kind",
    "loss",
    "tokens",
    "examples",
    "expert_version",
    "gateway_version",
    "routing_accuracy",
    "final",
)
UPDATE_COLUMNS = (
    "seq",
    "created_at",
    "worker_id",
    "expert",
    "accepted",
    "reason",
    "staleness",
    "weight",
    "train_loss",
    "num_tokens",
    "expert_version",
    "verdict",
    "dp_epsilon",
)


@dataclass(frozen=True)
class EvalResult:
    """One model measured on a worker's validation set."""

    kind: str
    loss: float
    tokens: int
    examples: int
    routing_accuracy: float | None = None


@dataclass(frozen=True)
class EvalReport:
    """What a worker sends: who, on which versions, and the results."""

    worker_id: str
    expert: str
    expert_version: int
    gateway_version: int
    results: tuple[EvalResult, ...]
    final: bool = False


def check_report(coordinator: CentralCoordinator, report: EvalReport) -> None:
    """Refuse a report naming an unknown expert or worker, or versions that never existed.

    Numbers are checked too (finite, non-negative, counts in range) so that a direct
    caller of this function gets the same guarantees as the HTTP schema gives.
    """
    experts = coordinator.experts
    if report.expert not in experts:
        raise errors.UnknownExpertError(
            f"unknown expert {report.expert!r}; this coordinator has {sorted(experts)}"
        )
    coordinator.workers.check(report.worker_id, report.expert)
    current = {"expert_version": experts[report.expert].version}
    current["gateway_version"] = coordinator.gateway.version
    for name, now in current.items():
        value = getattr(report, name)
        if not 0 <= value <= now:
            raise errors.InvalidUpdateError(f"{name} {value} is invalid: must be 0..{now}")
    for result in report.results:
        _check_result(result)


def _check_result(result: EvalResult) -> None:
    if result.kind not in EVAL_KINDS:
        raise errors.InvalidUpdateError(f"kind must be one of {EVAL_KINDS}, got {result.kind!r}")
    if not (math.isfinite(result.loss) and result.loss >= 0):
        raise errors.InvalidUpdateError(f"loss must be finite and >= 0, got {result.loss}")
    if not 1 <= result.tokens <= MAX_NUM_TOKENS or result.examples < 1:
        raise errors.InvalidUpdateError("tokens and examples must be positive counts")
    accuracy = result.routing_accuracy
    if accuracy is not None and not (math.isfinite(accuracy) and 0 <= accuracy <= 1):
        raise errors.InvalidUpdateError(f"routing_accuracy must be in [0, 1], got {accuracy}")


class EvaluationLog(Database):
    """The ``evaluations`` table (and read-only views of the update ledger)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    def record(self, report: EvalReport) -> list[dict[str, Any]]:
        """Store every result of ``report`` in one transaction; return the stored rows."""
        now = time.time()
        rows = [
            (
                now,
                report.worker_id,
                report.expert,
                r.kind,
                r.loss,
                r.tokens,
                r.examples,
                report.expert_version,
                report.gateway_version,
                r.routing_accuracy,
                int(report.final),
            )
            for r in report.results
        ]
        marks = ", ".join("?" for _ in COLUMNS[1:])
        with self._lock, self._transaction() as db:
            seqs = [
                db.execute(
                    f"INSERT INTO evaluations ({', '.join(COLUMNS[1:])}) VALUES ({marks})", row
                ).lastrowid
                for row in rows
            ]
        return [dict(zip(COLUMNS, (seq, *row))) for seq, row in zip(seqs, rows)]

    def history(
        self,
        *,
        expert: str | None = None,
        worker_id: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Evaluation rows matching every given filter, newest first."""
        filters: dict[str, str | float | None] = {
            "expert = ?": expert,
            "worker_id = ?": worker_id,
            "kind = ?": kind,
            "created_at >= ?": since,
            "created_at <= ?": until,
        }
        where = [clause for clause, value in filters.items() if value is not None]
        args = [value for value in filters.values() if value is not None]
        sql = f"SELECT {', '.join(COLUMNS)} FROM evaluations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._query(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit))
        return [dict(zip(COLUMNS, row)) | {"final": bool(row[-1])} for row in rows]

    def federated_losses(self) -> dict[tuple[str, str], float]:
        """(expert, kind) → token-weighted mean of each worker's latest loss (FedAvg-style)."""
        rows = self._query(
            "SELECT expert, kind, SUM(loss * tokens) / SUM(tokens) FROM evaluations "
            "WHERE seq IN (SELECT MAX(seq) FROM evaluations GROUP BY expert, kind, worker_id) "
            "GROUP BY expert, kind"
        )
        return {(expert, kind): float(loss) for expert, kind, loss in rows}

    def updates(self, *, after: int = 0, limit: int = 2000) -> list[dict[str, Any]]:
        """Ledger rows (accepted and refused by policy) with ``seq > after``, newest first."""
        rows = self._query(
            f"SELECT {', '.join(UPDATE_COLUMNS)} FROM updates WHERE seq > ? "
            "ORDER BY seq DESC LIMIT ?",
            (after, limit),
        )
        return [dict(zip(UPDATE_COLUMNS, row)) | {"accepted": bool(row[4])} for row in rows]
