"""Section ``ack-latency``: how long an upload waits for its durable acknowledgement.

For bfloat16 bodies of the Qwen2.5-0.5B and Qwen2.5-7B LoRA shapes (r=16, all seven
projections; 17.6 MB and 80.8 MB), one client uploads sequentially to: the coordinator
of this checkout (write-ahead log: one fsync of the body as received, snapshots in the
background), the coordinator *before* the log (the ``fedmoe`` package of commit
``BEFORE``, extracted by ``git archive``: a float32 snapshot of the expert and a second
fsync for the ledger per update), and the FLOOR (the same bytes over loopback HTTP and
one fsync, nothing else). Runs alternate (new, before, FLOOR, repeated) so that outside
load hits all three alike.
"""

from __future__ import annotations

import subprocess
import tarfile
from io import BytesIO
from pathlib import Path
from typing import Any

from benchmarks._concurrency import write_body
from benchmarks._harness import ROOT, LoadResult, percentile, progress, run_load, server

BEFORE = "4882d1d"  # main before the write-ahead log
SHAPES = {"qwen": "Qwen2.5-0.5B shape (r=16)", "qwen7": "Qwen2.5-7B shape (r=16)"}


def extract_before(directory: Path, commit: str = BEFORE) -> Path:
    """The ``fedmoe`` package of ``commit`` under ``directory`` (nothing else of it)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "fedmoe"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    return directory


def measure(root: Path, *, seconds: float, rounds: int) -> dict[str, Any]:
    """Per shape: sequential acknowledgement latencies of new, before and FLOOR."""
    before_root = extract_before(root / "before-src")
    rows = []
    for shape, label in SHAPES.items():
        directory = root / shape
        with (
            server(directory / "new", shape=shape, experts=1) as new,
            server(directory / "before", shape=shape, experts=1, fedmoe_root=before_root) as old,
            server(directory / "floor", floor=True) as floor,
        ):
            schema, body_file, body_bytes = write_body(new.url, directory)
            times: dict[str, list[float]] = {"new": [], "before": [], "floor": []}
            targets = (("new", new.url, "coordinator"), ("before", old.url, "coordinator"))
            for index in range(rounds):
                for name, url, mode in (*targets, ("floor", floor.url, "floor")):
                    progress(f"ack latency {shape}: {name}, round {index + 1}/{rounds}")
                    result: LoadResult = run_load(
                        url,
                        [(f"r{index}-{name}", "e0")],
                        procs=1,
                        seconds=seconds,
                        body_file=body_file,
                        directory=directory / f"load-{name}-{index}",
                        mode=mode,
                        min_count=2,
                        schema=schema,
                    )
                    if not result.records:
                        raise RuntimeError(f"{shape} {name}: no upload; {result.errors[:3]}")
                    times[name] += result.latencies()
        p50 = {name: 1e3 * percentile(values, 50) for name, values in times.items()}
        rows.append(
            {
                "adapter": label,
                "body_bytes": body_bytes,
                "uploads": {name: len(values) for name, values in times.items()},
                "p50_ms": p50,
                "p90_ms": {name: 1e3 * percentile(v, 90) for name, v in times.items()},
                "ratio_new": p50["new"] / p50["floor"],
                "ratio_before": p50["before"] / p50["floor"],
            }
        )
    return {"before": BEFORE, "seconds": seconds, "rounds": rounds, "rows": rows}
