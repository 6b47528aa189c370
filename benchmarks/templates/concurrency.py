"""``concurrency``: 30 concurrent clients against one coordinator, and no lost update."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import loads, markdown_table, ms

RUN_HEADERS = [
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
CHECK_HEADERS = [
    "expert",
    "version",
    "accepted (/v1/status)",
    "acks received",
    "ack versions 1..n",
    "check",
]


def _run_row(run: dict[str, Any]) -> list[Any]:
    return [
        run["label"],
        run["acks"],
        f"{run['rate']:.1f}",
        ms(run["p50_ms"]),
        ms(run["p90_ms"]),
        ms(run["p99_ms"]),
        ms(run["max_ms"]),
        f"{run['staleness_mean']:.1f} / {run['staleness_max']}",
        run["errors"],
        "PASS" if run["ok"] else "FAIL",
    ]


def _check_row(check: dict[str, Any]) -> list[Any]:
    return [
        check["expert"],
        check["version"],
        check["accepted"],
        check["acks"],
        "yes" if check["contiguous"] else "NO",
        "PASS" if check["ok"] else "FAIL",
    ]


def _notes(ledger: dict[str, Any]) -> str:
    first = f" (first: {ledger['first_error']})" if ledger["first_error"] else ""
    return (
        f"ledger read via {ledger['read_via']}: {ledger['accepted_rows']} accepted rows, "
        f"{ledger['missing']} acked ids missing; client errors: {ledger['client_errors']}{first}"
    )


def _comparison(runs: list[dict[str, Any]]) -> str:
    if len(runs) < 2:
        return "(the thread comparison runs only in a full run)."
    procs, threads = runs[0]["rate"], runs[1]["rate"]
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


def render(v: dict[str, Any]) -> str:
    """The section body."""
    runs, main = v["runs"], v["runs"][0]
    ok = all(run["ok"] for run in runs)
    before = loads(v["load_before"], " / ", brackets=False)
    after = loads(v["load_after"], " / ", brackets=False)
    return f"""
**Result: {"PASS" if ok else "FAIL"}** (no lost update in {"any run" if len(runs) > 1 else "the run"}).

A real coordinator (tiny preset, experts e0..e2, `fedmoe.api.create_app` under uvicorn
exactly as `fedmoe coordinator` runs it: one process, access log on) in its own process,
on a fresh state dir per run; 30 workers (10 per expert), each registered as its own
worker, push the same bf16 delta ({main["body_bytes"]:,} bytes) back to back for {v["seconds"]:g} s,
with `base_version` = the version of their own last acknowledgement, so staleness is what
the other 9 workers of the expert make it. Latency = send to acknowledgement (the expert
file fsync+rename and the SQLite commit included). Machine load average (1/5/15 min):
{before} before, {after} after; the 2 cores are shared by the server, the
clients and whatever else runs.

{markdown_table(RUN_HEADERS, [_run_row(run) for run in runs])}

Checks after the 30-process run (each run is checked the same way): each expert's
version equals its `updates_applied` in `/v1/status` and the number of acknowledgements
the clients received for it, and the acknowledged versions are exactly 1..n (no version
handed out twice); {_notes(main["ledger"])}.

{markdown_table(CHECK_HEADERS, [_check_row(c) for c in main["checks"]])}

Client processes vs threads: {_comparison(runs)} Coordinator peak RSS (VmHWM):
{main["peak_rss_mib"]:.0f} MiB.
"""
