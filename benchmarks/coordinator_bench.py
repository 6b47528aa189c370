"""Coordinator benchmarks: concurrency + no lost update, and per-update cost vs a FLOOR.

Run ``.venv/bin/python -m benchmarks.coordinator_bench`` (about 5-8 minutes on 2 cores)
to refresh the ``ack-latency``, ``concurrency`` and ``coordinator-speed`` sections of
``benchmarks/RESULTS.md`` (JSON in ``benchmarks/results``, rendered by
``benchmarks.render``). ``--quick`` is a smoke test (under 2 minutes) whose JSON goes to a
temporary directory unless ``--write`` or ``--results-dir`` is given. The process exits 1 when the
no-lost-update check fails.

Every server (coordinator or FLOOR) is a subprocess (``benchmarks._coordinator_server``)
and every client runs in ``benchmarks._load`` processes, so clients and server never
share a GIL. Other work may run on the machine meanwhile: comparisons are ratios
taken side by side in the same run, and the load average is reported with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import _ack_latency, _concurrency, _speed
from benchmarks.report import add_output_flags, publish


@dataclass(frozen=True)
class Plan:
    """How long and how often each measurement runs (the defaults: the full run)."""

    concurrency_seconds: float = 20.0
    thread_comparison: bool = True
    speed_seconds: dict[str, float] = field(default_factory=lambda: {"tiny": 6.0, "qwen": 10.0})
    min_sequential: dict[str, int] = field(default_factory=lambda: {"tiny": 100, "qwen": 20})
    repeat: dict[str, int] = field(default_factory=lambda: {"tiny": 50, "qwen": 8})
    memory_updates: int = 2
    many_experts: int = 30
    clients: tuple[int, ...] = (1, 10, 30)
    linear_at_3: bool = True


FULL = Plan()
QUICK = Plan(
    concurrency_seconds=3.0,
    thread_comparison=False,
    speed_seconds={"tiny": 1.5, "qwen": 1.5},
    min_sequential={"tiny": 10, "qwen": 3},
    repeat={"tiny": 8, "qwen": 2},
    memory_updates=1,
    many_experts=4,
    clients=(1, 10),
    linear_at_3=False,
)


def concurrency_values(root: Path, plan: Plan) -> dict[str, Any]:
    """30 client processes (and, in a full run, 30 threads in one process), each checked."""
    load_before = list(os.getloadavg())
    secs = f"{plan.concurrency_seconds:g} s"
    runs = [
        {"label": f"30 processes × 1 thread, {secs}"}
        | _concurrency.one_run(root / "procs", plan.concurrency_seconds, procs=30)
    ]
    if plan.thread_comparison:
        runs.append(
            {"label": f"1 process × 30 threads, {secs}"}
            | _concurrency.one_run(root / "threads", plan.concurrency_seconds, procs=1)
        )
    return {
        "seconds": plan.concurrency_seconds,
        "load_before": load_before,
        "load_after": list(os.getloadavg()),
        "runs": runs,
    }


SHAPES = {"tiny": "tiny preset (r=8)", "qwen": "Qwen2.5-0.5B shape (r=16)"}


def speed_values(root: Path, plan: Plan) -> dict[str, Any]:
    """Sequential latency, throughput vs FLOOR, phase breakdown, gateway and memory."""
    from benchmarks import _breakdown
    from benchmarks._coordinator_server import QWEN_RANK, qwen_initial

    load_before = list(os.getloadavg())
    clients = list(plan.clients)
    measured = {
        shape: _speed.measure_shape(
            root / f"speed-{shape}",
            shape,
            seconds=plan.speed_seconds[shape],
            min_sequential=plan.min_sequential[shape],
            clients=clients,
        )
        for shape in SHAPES
    }
    phases = {shape: _breakdown.phase_breakdown(shape, plan.repeat[shape]) for shape in SHAPES}
    initials = {"tiny": (_breakdown.tiny_initial(), 8), "qwen": (qwen_initial(), QWEN_RANK)}
    gateway = []
    for shape, experts in (("tiny", 3), ("qwen", 3), ("qwen", plan.many_experts)):
        init, rank = initials[shape]
        cost = _breakdown.gateway_cost(init, rank, experts)
        gateway.append(
            {
                "adapter": SHAPES[shape],
                "experts": experts,
                "rank": rank * experts,
                "bytes": cost["bytes"],
                "merge_ms": 1e3 * cost["merge"],
                "encode_ms": 1e3 * cost["encode"],
                "write_ms": 1e3 * cost["write"],
                "total_ms": 1e3 * (cost["merge"] + cost["encode"] + cost["write"]),
            }
        )
    many = plan.many_experts
    memory = [
        _breakdown.memory_run(root / f"memory-{n}-{method}", n, plan.memory_updates, method)
        for n, method in ((3, "cat"), (3, "linear"), (many, "cat"), (many, "linear"))
        if plan.linear_at_3 or (n, method) != (3, "linear")
    ]
    return {
        "load_before": load_before,
        "load_after": list(os.getloadavg()),
        "min_sequential": plan.min_sequential,
        "speed_seconds": plan.speed_seconds,
        "repeat": plan.repeat,
        "memory_updates": plan.memory_updates,
        "many_experts": many,
        "sequential": [_speed.sequential_row(SHAPES[s], measured[s]) for s in SHAPES],
        "throughput": [
            row for s in SHAPES for row in _speed.throughput_rows(SHAPES[s], measured[s], clients)
        ],
        "peak_rss_mib": {s: measured[s]["memory"]["VmHWM"] for s in SHAPES},
        "phases_source": "instrumented",
        "phases": [
            {"step": step, "tiny_ms": 1e3 * phases["tiny"][step], "qwen_ms": 1e3 * seconds}
            for step, seconds in phases["qwen"].items()
        ],
        "gateway": gateway,
        "memory": memory,
    }


def main(argv: list[str] | None = None) -> int:
    """Run both sections; return 1 if the no-lost-update check failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke test (< 2 min)")
    parser.add_argument(
        "--ack-latency-only",
        action="store_true",
        help="only the acknowledgement latency section (new vs before vs FLOOR)",
    )
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="only the per-update cost section (sequential and throughput vs FLOOR, phases, "
        "gateway, memory)",
    )
    add_output_flags(parser)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="fedmoe-coordinator-bench-") as tmp:
        root = Path(tmp)
        if args.speed_only:
            title = "Coordinator: per-update cost vs the FLOOR, memory"
            publish("coordinator-speed", title, speed_values(root, plan), args)
            return 0
        seconds, rounds = (3.0, 2) if args.quick else (10.0, 3)
        values = _ack_latency.measure(root / "ack", seconds=seconds, rounds=rounds)
        title = "Coordinator: acknowledgement latency, write-ahead log vs before vs FLOOR"
        publish("ack-latency", title, values, args)
        if args.ack_latency_only:
            return 0
        values = concurrency_values(root, plan)
        title = "Coordinator: 30 concurrent clients, no lost update"
        publish("concurrency", title, values, args)
        ok = all(run["ok"] for run in values["runs"])
        title = "Coordinator: per-update cost vs the FLOOR, memory"
        publish("coordinator-speed", title, speed_values(root, plan), args)
    print("no lost update:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
