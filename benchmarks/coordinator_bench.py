"""Coordinator benchmarks: concurrency + no lost update, and per-update cost vs a FLOOR.

Run ``.venv/bin/python -m benchmarks.coordinator_bench`` (about 5-8 minutes on 2 cores)
to refresh the ``concurrency`` and ``coordinator-speed`` sections of
``benchmarks/RESULTS.md``. ``--quick`` is a smoke test (under 2 minutes) that prints
the tables but only writes RESULTS.md with ``--write``. The process exits 1 when the
no-lost-update check fails.

Every server (coordinator or FLOOR) is a subprocess (``benchmarks._coordinator_server``)
and every client runs in ``benchmarks._load`` processes, so clients and server never
share a GIL. Other work may run on the machine meanwhile: comparisons are ratios
taken side by side in the same run, and the load average is reported with them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks import _concurrency, _speed
from benchmarks._harness import loadavg_text, ms
from benchmarks.report import markdown_table, publish


@dataclass(frozen=True)
class Plan:
    """How long and how often each measurement runs."""

    concurrency_seconds: float
    thread_comparison: bool
    speed_seconds: dict[str, float]
    min_sequential: dict[str, int]
    repeat: dict[str, int]
    memory_updates: int
    many_experts: int
    clients: tuple[int, ...]
    linear_at_3: bool


FULL = Plan(
    concurrency_seconds=20.0,
    thread_comparison=True,
    speed_seconds={"tiny": 6.0, "qwen": 10.0},
    min_sequential={"tiny": 100, "qwen": 20},
    repeat={"tiny": 50, "qwen": 8},
    memory_updates=2,
    many_experts=30,
    clients=(1, 10, 30),
    linear_at_3=True,
)
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


def concurrency_section(root: Path, plan: Plan) -> tuple[str, bool]:
    """30 client processes (and, in a full run, 30 threads in one process), each checked."""
    load_before = loadavg_text()
    secs = f"{plan.concurrency_seconds:g} s"
    runs = {
        f"30 processes × 1 thread, {secs}": _concurrency.one_run(
            root / "procs", plan.concurrency_seconds, procs=30
        )
    }
    if plan.thread_comparison:
        runs[f"1 process × 30 threads, {secs}"] = _concurrency.one_run(
            root / "threads", plan.concurrency_seconds, procs=1
        )
    ok = all(run["ok"] for run in runs.values())
    main_run, *others = runs.values()
    headers = [
        "clients",
        "acks",
        "acks/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "staleness mean / max",
        "errors",
        "no lost update",
    ]
    table = markdown_table(
        headers, [_concurrency.summary_row(label, run) for label, run in runs.items()]
    )
    checks = markdown_table(
        [
            "expert",
            "version",
            "accepted (/v1/status)",
            "acks received",
            "ack versions 1..n",
            "check",
        ],
        main_run["table"],
    )
    comparison = (
        _gil_verdict(main_run, others[0])
        if others
        else "(the thread comparison runs only in a full run)."
    )
    return (
        f"""
**Result: {"PASS" if ok else "FAIL"}** (no lost update in {"any run" if others else "the run"}).

A real coordinator (tiny preset, experts e0..e2, `fedmoe.api.create_app` under uvicorn
exactly as `fedmoe coordinator` runs it: one process, access log on) in its own process,
on a fresh state dir per run; 30 workers (10 per expert), each registered as its own
worker, push the same bf16 delta ({main_run["body"]:,} bytes) back to back for {secs},
with `base_version` = the version of their own last acknowledgement, so staleness is what
the other 9 workers of the expert make it. Latency = send to acknowledgement (the expert
file fsync+rename and the SQLite commit included). Machine load average (1/5/15 min):
{load_before} before, {loadavg_text()} after; the 2 cores are shared by the server, the
clients and whatever else runs.

{table}

Checks after the 30-process run (each run is checked the same way): each expert's
version equals its `updates_applied` in `/v1/status` and the number of acknowledgements
the clients received for it, and the acknowledged versions are exactly 1..n (no version
handed out twice); {main_run["notes"]}.

{checks}

Client processes vs threads: {comparison} Coordinator peak RSS (VmHWM):
{main_run["memory"]["VmHWM"]:.0f} MiB.
""",
        ok,
    )


def _gil_verdict(procs_run: dict, threads_run: dict) -> str:
    procs, threads = procs_run["result"].rate, threads_run["result"].rate
    ratio = threads / max(procs, 1e-9)
    if ratio >= 0.9:
        return (
            f"{procs:.1f} vs {threads:.1f} acks/s: threads reach {ratio:.0%} of the processes' "
            "rate, so the clients are not GIL-bound; the server is the bottleneck (one "
            "process; updates to one expert are serialised by its lock and each waits for "
            "its fsyncs, while different experts' updates proceed in parallel)."
        )
    return (
        f"{procs:.1f} vs {threads:.1f} acks/s: threads reach only {ratio:.0%} of the "
        "processes' rate, so one client process is GIL-bound and the 30-process figures "
        "are the coordinator's."
    )


def speed_section(root: Path, plan: Plan) -> str:
    """Sequential latency, throughput vs FLOOR, phase breakdown, gateway and memory."""
    from benchmarks import _breakdown
    from benchmarks._coordinator_server import QWEN_RANK, qwen_initial

    load_before = loadavg_text()
    clients = list(plan.clients)
    shapes = {"tiny": "tiny preset (r=8)", "qwen": "Qwen2.5-0.5B shape (r=16)"}
    measured = {
        shape: _speed.measure_shape(
            root / f"speed-{shape}",
            shape,
            seconds=plan.speed_seconds[shape],
            min_sequential=plan.min_sequential[shape],
            clients=clients,
        )
        for shape in shapes
    }
    sequential = markdown_table(
        [
            "adapter",
            "params",
            "bf16 body",
            "uploads",
            "coordinator p50 ms",
            "coordinator p90 ms",
            "FLOOR p50 ms",
            "FLOOR HTTP-only p50 ms",
            "coordinator / FLOOR",
        ],
        [_speed.sequential_row(label, measured[shape]) for shape, label in shapes.items()],
    )
    throughput = markdown_table(
        [
            "adapter",
            "clients",
            "coordinator upd/s",
            "FLOOR upd/s",
            "coordinator / FLOOR",
            "coordinator p50 ms",
            "FLOOR p50 ms",
            "errors",
        ],
        [
            row
            for shape, label in shapes.items()
            for row in _speed.throughput_rows(label, measured[shape], clients)
        ],
    )
    initials = {"tiny": (_breakdown.tiny_initial(), 8), "qwen": (qwen_initial(), QWEN_RANK)}
    phases = {
        shape: _breakdown.phase_breakdown(init, rank, plan.repeat[shape])
        for shape, (init, rank) in initials.items()
    }
    phase_rows = [
        [name, ms(phases["tiny"][name]), ms(phases["qwen"][name])] for name in phases["tiny"]
    ]
    breakdown = markdown_table(
        ["step (in-process, median)", "tiny ms", "Qwen-shape ms"], phase_rows
    )
    gateway_rows = []
    many = plan.many_experts
    for shape, experts in (("tiny", 3), ("qwen", 3), ("qwen", many)):
        init, rank = initials[shape]
        cost = _breakdown.gateway_cost(init, rank, experts)
        gateway_rows.append(
            [
                shapes[shape],
                experts,
                rank * experts,
                f"{cost['bytes'] / 1e6:,.1f} MB",
                ms(cost["merge"]),
                ms(cost["encode"]),
                ms(cost["write"]),
                ms(cost["merge"] + cost["encode"] + cost["write"]),
            ]
        )
    gateway = markdown_table(
        [
            "adapter",
            "experts",
            "gateway rank",
            "gateway file",
            "cat merge ms",
            "encode ms",
            "write ms",
            "total per rebuild ms",
        ],
        gateway_rows,
    )
    memory = {
        (n, method): _breakdown.memory_run(
            root / f"memory-{n}-{method}", n, plan.memory_updates, method
        )
        for n, method in ((3, "cat"), (3, "linear"), (many, "cat"), (many, "linear"))
        if plan.linear_at_3 or (n, method) != (3, "linear")
    }
    memory_table = _breakdown.memory_table(list(memory.values()))
    q_many = gateway_rows[-1]
    m3, m_many, lin_many = memory[(3, "cat")], memory[(many, "cat")], memory[(many, "linear")]
    return f"""
Machine load average (1/5/15 min): {load_before} before, {loadavg_text()} after.
Coordinator and FLOOR are both one uvicorn process (access log on), started side by
side; each measurement on the coordinator is followed at once by the same one on the
FLOOR. FLOOR = FastAPI endpoint that reads the same body over loopback HTTP and writes
it with temp file + fsync + rename + directory fsync (`fedmoe.adapters.atomic_write`);
"HTTP-only" skips the write. The coordinator does more durable I/O than the FLOOR by
design: its expert file is float32 (2× the bf16 body) and the SQLite WAL commit is a
second fsync. Sequential = one client, uploads back to back (at least
{plan.min_sequential["tiny"]} / {plan.min_sequential["qwen"]}); throughput runs last
{plan.speed_seconds["tiny"]:g} s / {plan.speed_seconds["qwen"]:g} s per point, clients as
separate processes, 3 experts.

### One update, sequential

{sequential}

### Throughput

{throughput}

Coordinator peak RSS (VmHWM) after these runs, concurrent uploads included: tiny
{measured["tiny"]["memory"]["VmHWM"]:,.0f} MiB, Qwen-shaped (3 experts)
{measured["qwen"]["memory"]["VmHWM"]:,.0f} MiB.

### Where the time goes in one update

Each step of `CentralCoordinator._apply` timed in a worker thread of this process (as the
server runs them in anyio's threadpool), interleaved, median of
{plan.repeat["tiny"]} / {plan.repeat["qwen"]}; then an in-process `submit_update` (no HTTP),
whose total also pays for the gateway rebuild the store's writer thread does meanwhile:

{breakdown}

### The `cat` gateway

With `merge_method=cat` (the default) the gateway has rank r × experts, so its size grows
linearly with the number of experts. API reads merge the newest version on demand; the
file `gateway.safetensors` (for operators) is rewritten by the store's background thread
with the newest version at most every `--gateway-file-interval` seconds (default 5), so a
full rebuild (merge + encode + fsync'd write) costs at most once per interval, not per update.

{gateway}

### Memory (Qwen-shaped experts, separate coordinator process)

Peak RSS (`VmHWM` of `/proc/PID/status`) after {plan.memory_updates} sequential update(s)
to each expert, then after one `GET /v1/gateway/adapter`:

{memory_table}

At {many} experts the `cat` gateway is {q_many[3]} (rank {q_many[2]}) and one rebuild
costs {q_many[7]} ms of CPU and disk in this process (merge {q_many[4]} + encode
{q_many[5]} + write {q_many[6]} ms), paid at most once per `--gateway-file-interval`
(5 s) in the background, and by the first `GET` of a new version. In the coordinator
process, going from 3 to {many} experts with `cat` takes peak RSS from
{m3["hwm"]:,.0f} to {m_many["hwm"]:,.0f} MiB, the median sequential update from
{ms(m3["p50"])} to {ms(m_many["p50"])} ms (p90 {ms(m3["p90"])} → {ms(m_many["p90"])} ms)
and one gateway download from {ms(m3["gateway_seconds"])} to
{ms(m_many["gateway_seconds"])} ms; the same {many} experts with `merge_method=linear`
(a rank-r gateway) peak at {lin_many["hwm"]:,.0f} MiB with a median update of
{ms(lin_many["p50"])} ms and a {ms(lin_many["gateway_seconds"])} ms download.
"""


def main(argv: list[str] | None = None) -> int:
    """Run both sections; return 1 if the no-lost-update check failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke test (< 2 min)")
    parser.add_argument("--write", action="store_true", help="write RESULTS.md even in --quick")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    write = args.write or not args.quick
    with tempfile.TemporaryDirectory(prefix="fedmoe-coordinator-bench-") as tmp:
        root = Path(tmp)
        body, ok = concurrency_section(root, plan)
        publish(
            "concurrency", "Coordinator: 30 concurrent clients, no lost update", body, write=write
        )
        body = speed_section(root, plan)
        title = "Coordinator: per-update cost vs the FLOOR, memory"
        publish("coordinator-speed", title, body, write=write)
    print("no lost update:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
