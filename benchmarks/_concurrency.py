"""Section ``concurrency``: 30 concurrent clients against one real coordinator, then checks.

The coordinator (tiny preset, experts e0..e2) runs in its own process; 30 workers
(10 per expert) push bf16 deltas for a fixed time at staleness as it comes. After
the run the experts' versions, the ``accepted`` counters of ``/v1/status``, the
acknowledgements the clients received and the ledger rows must all agree.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks._harness import (
    LoadResult,
    percentile,
    proc_memory,
    progress,
    run_load,
    server,
)

CLIENTS = 30
EXPERTS = 3
LEDGER_API_LIMIT = 10000


def write_body(url: str, directory: Path, seed: int = 1) -> tuple[dict[str, Any], Path, int]:
    """A random bf16 safetensors delta of the server's shapes, written to ``directory``.

    Returns the server's ``/v1/schema``, the file and its size.
    """
    import torch

    from benchmarks._coordinator_server import random_delta
    from fedmoe.adapters import encode_adapter

    schema: dict[str, Any] = httpx.get(url + "/v1/schema", timeout=30).json()
    shapes = {key: tuple(shape) for key, shape in schema["tensors"].items()}
    body = encode_adapter(random_delta(shapes, seed), dtype=torch.bfloat16)
    path = directory / "delta.safetensors"
    path.write_bytes(body)
    return schema, path, len(body)


def ledger_ids(url: str, state_dir: Path, total: int) -> tuple[set[str], int, str]:
    """Accepted update ids in the ledger, the accepted row count, and how they were read."""
    if total < LEDGER_API_LIMIT:
        rows = httpx.get(url + "/v1/ledger", params={"limit": LEDGER_API_LIMIT}, timeout=120).json()
        accepted = [row["update_id"] for row in rows if row["accepted"]]
        return set(accepted), len(accepted), "GET /v1/ledger"
    uri = f"file:{state_dir / 'ledger.sqlite3'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as db:
        accepted = [row[0] for row in db.execute("SELECT update_id FROM updates WHERE accepted=1")]
    return set(accepted), len(accepted), "SQLite file (more rows than the API's limit)"


def verify(
    url: str, state_dir: Path, result: LoadResult
) -> tuple[bool, list[dict[str, Any]], dict[str, Any]]:
    """The no-lost-update checks: (passed, per-expert checks, what the ledger said)."""
    status = httpx.get(url + "/v1/status", timeout=60).json()
    acks = [r for r in result.records if not r["replayed"]]
    per_expert = Counter(r["expert"] for r in acks)
    ids, rows_accepted, how = ledger_ids(url, state_dir, len(acks))
    missing = [r["id"] for r in acks if r["id"] not in ids]
    ok = not result.errors and not missing and rows_accepted == len(acks)
    checks = []
    for name, info in sorted(status["experts"].items()):
        versions = sorted(r["version"] for r in acks if r["expert"] == name)
        contiguous = versions == list(range(1, len(versions) + 1))
        row_ok = info["version"] == info["updates_applied"] == per_expert[name] and contiguous
        ok = ok and row_ok
        checks.append(
            {
                "expert": name,
                "version": info["version"],
                "accepted": info["updates_applied"],
                "acks": per_expert[name],
                "contiguous": contiguous,
                "ok": row_ok,
            }
        )
    ledger = {
        "read_via": how,
        "accepted_rows": rows_accepted,
        "missing": len(missing),
        "client_errors": len(result.errors),
        "first_error": result.errors[0] if result.errors else None,
    }
    return ok, checks, ledger


def one_run(directory: Path, seconds: float, procs: int) -> dict[str, Any]:
    """One 30-client run on a fresh state dir; returns figures and check results."""
    progress(f"concurrency: {CLIENTS} clients in {procs} process(es) for {seconds:g} s")
    with server(directory, shape="tiny", experts=EXPERTS) as srv:
        schema, body_file, size = write_body(srv.url, directory)
        workers = [(f"w{i:02d}", f"e{i % EXPERTS}") for i in range(CLIENTS)]
        result = run_load(
            srv.url,
            workers,
            procs=procs,
            seconds=seconds,
            body_file=body_file,
            directory=directory / "load",
            schema=schema,
        )
        ok, checks, ledger = verify(srv.url, directory / "state", result)
        memory = proc_memory(srv.pid)
    latencies = result.latencies()
    staleness = [r["staleness"] for r in result.records]
    return {
        "acks": len(result.records),
        "rate": result.rate,
        "p50_ms": 1e3 * percentile(latencies, 50),
        "p90_ms": 1e3 * percentile(latencies, 90),
        "p99_ms": 1e3 * percentile(latencies, 99),
        "max_ms": 1e3 * max(latencies, default=float("nan")),
        "staleness_mean": sum(staleness) / max(len(staleness), 1),
        "staleness_max": max(staleness, default=0),
        "errors": len(result.errors),
        "ok": ok,
        "body_bytes": size,
        "peak_rss_mib": memory["VmHWM"],
        "ledger": ledger,
        "checks": checks,
    }
