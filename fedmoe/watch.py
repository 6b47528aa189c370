"""``fedmoe status --watch``: the dashboard's picture in the terminal (rich Live).

Experts (version, update rate, active workers, latest federated evaluation losses of
the expert, the merged and the routed gateway, and the share of the expert's own
prompts the router sends to it),
workers with liveness, and the most recent refused uploads, refreshed every few
seconds until Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Column, Table
from rich.text import Text

from fedmoe.client import ApiError, CoordinatorClient
from fedmoe.schemas import StatusInfo

ACTIVE_S = 60.0
RATE_WINDOW_S = 300.0


@dataclass
class Snapshot:
    """What one refresh reads from the coordinator."""

    status: StatusInfo
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    taken_at: float = field(default_factory=time.time)


def read_snapshot(client: CoordinatorClient) -> Snapshot:
    """Status, evaluation history, recent updates and refusals, in one go."""
    since = time.time() - RATE_WINDOW_S
    updates = [u for u in client.update_history(limit=5000) if u["created_at"] >= since]
    return Snapshot(
        status=client.status(),
        evaluations=client.evaluation_history(limit=5000),
        updates=updates,
        rejections=client.rejections(limit=8),
    )


def federated_loss(evaluations: list[dict[str, Any]], expert: str, kind: str) -> float | None:
    """Token-weighted mean of each worker's latest loss for (expert, kind), as /metrics says."""
    latest: dict[str, dict[str, Any]] = {}
    for row in evaluations:  # newest first: keep each worker's first row
        if row["expert"] == expert and row["kind"] == kind:
            latest.setdefault(row["worker_id"], row)
    tokens: int = sum(row["tokens"] for row in latest.values())
    if not tokens:
        return None
    total: float = sum(row["loss"] * row["tokens"] for row in latest.values())
    return total / tokens


def federated_accuracy(evaluations: list[dict[str, Any]], expert: str) -> float | None:
    """Example-weighted routing accuracy of each worker's latest ``routed`` evaluation."""
    latest: dict[str, dict[str, Any]] = {}
    for row in evaluations:  # newest first
        if row["expert"] == expert and row["kind"] == "routed":
            latest.setdefault(row["worker_id"], row)
    rows = [r for r in latest.values() if r.get("routing_accuracy") is not None]
    examples: int = sum(r["examples"] for r in rows)
    if not examples:
        return None
    return float(sum(r["routing_accuracy"] * r["examples"] for r in rows)) / examples


def render(snapshot: Snapshot) -> RenderableType:
    """The whole screen for one snapshot."""
    status, now = snapshot.status, snapshot.taken_at
    gateway = status.gateway
    header = Text.assemble(
        ("FedMoE ", "bold"),
        f"base {status.base_model} · gateway v{gateway.version} "
        f"({gateway.merge_method}, rank {gateway.lora_rank}) · "
        f"{time.strftime('%H:%M:%S', time.localtime(now))}",
    )
    parts: list[RenderableType] = [header, _experts(snapshot), _workers(status, now)]
    if snapshot.rejections:
        parts.append(_rejections(snapshot.rejections, now))
    return Group(*parts)


def _share(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def _loss(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _table(title: str, *, names: tuple[str, ...], numbers: tuple[str, ...]) -> Table:
    """Name columns (long ids fold) followed by right-aligned number columns."""
    return Table(
        *(Column(name, overflow="fold") for name in names),
        *(Column(number, justify="right") for number in numbers),
        title=title,
    )


def _experts(snapshot: Snapshot) -> Table:
    status, now = snapshot.status, snapshot.taken_at
    table = _table(
        "experts (federated validation loss: lower is better)",
        names=("expert",),
        numbers=(
            "version",
            "upd/min",
            "rejected",
            "workers",
            "eval expert",
            "eval gateway",
            "eval routed",
            "routed here",
        ),
    )
    first = min((u["created_at"] for u in snapshot.updates), default=now)
    minutes = max(min(RATE_WINDOW_S, now - first), 10.0) / 60
    for name, expert in status.experts.items():
        count = sum(1 for u in snapshot.updates if u["expert"] == name and u["accepted"])
        workers = [status.workers.get(w) for w in expert.workers]
        active = sum(1 for w in workers if w and now - w.last_seen < ACTIVE_S)
        table.add_row(
            name,
            str(expert.version),
            f"{count / minutes:.1f}",
            str(expert.updates_rejected),
            f"{active}/{len(workers)}",
            _loss(federated_loss(snapshot.evaluations, name, "expert")),
            _loss(federated_loss(snapshot.evaluations, name, "gateway")),
            _loss(federated_loss(snapshot.evaluations, name, "routed")),
            _share(federated_accuracy(snapshot.evaluations, name)),
        )
    return table


def _workers(status: StatusInfo, now: float) -> Table:
    table = _table(
        "workers",
        names=("worker", "expert"),
        numbers=("last seen", "updates", "tokens", "loss", "τ"),
    )
    for worker_id, w in sorted(status.workers.items(), key=lambda i: (i[1].specialty, i[0])):
        seen = now - w.last_seen
        style = "green" if seen < ACTIVE_S else "yellow" if seen < 5 * ACTIVE_S else "red"
        table.add_row(
            worker_id,
            w.specialty,
            Text(f"{seen:.0f}s ago", style=style),
            str(w.updates),
            str(w.tokens),
            _loss(w.last_train_loss),
            "" if w.last_staleness is None else str(w.last_staleness),
        )
    return table


def _rejections(rows: list[dict[str, Any]], now: float) -> Table:
    table = Table(
        "when",
        "expert",
        Column("worker", overflow="fold"),
        "reason",
        Column("detail", overflow="fold", ratio=1),
        title="recent refused uploads",
    )
    for row in rows:
        table.add_row(
            f"{now - row['time']:.0f}s ago",
            row["expert"],
            row["worker_id"],
            f"{row['status']} {row['reason']}",
            row["detail"],
        )
    return table


def watch(
    console: Console, client: CoordinatorClient, *, interval: float, sleep: Callable[[float], None]
) -> None:
    """Refresh the picture every ``interval`` seconds until interrupted (Ctrl-C)."""
    with Live(Text("connecting…"), console=console, auto_refresh=False) as live:
        try:
            while True:
                try:
                    live.update(render(read_snapshot(client)), refresh=True)
                except (httpx.HTTPError, ApiError) as error:
                    message = Text(f"cannot read the coordinator: {error}", style="red")
                    live.update(message, refresh=True)
                sleep(interval)
        except KeyboardInterrupt:
            pass


@contextmanager
def pause_until_interrupted() -> Iterator[Callable[[float], None]]:
    """A ``sleep`` for ``watch`` that Ctrl-C ends at the next pause (KeyboardInterrupt
    there) instead of wherever the program is: an interrupt inside an HTTP request can
    leave the client's connection pool locked, and closing it then hangs. A second Ctrl-C
    interrupts at once. Main thread only (it sets the SIGINT handler, restored after)."""
    stop = threading.Event()

    def on_interrupt(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # asked twice: do not wait for the request in flight
        stop.set()

    def pause(seconds: float) -> None:
        if stop.wait(seconds):
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield pause
    finally:
        signal.signal(signal.SIGINT, previous)
