"""Section ``coordinator-speed``, part 1: update latency and throughput against the FLOOR.

For one adapter shape, a coordinator process and a FLOOR process (FastAPI that reads
the body and writes it with fsync+rename, nothing else) run side by side, and each
measurement is taken on one right after the other, so machine load hits both alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import benchmarks._harness as harness
from benchmarks._concurrency import write_body

EXPERTS = 3


def _workers(count: int) -> list[tuple[str, str]]:
    return [(f"c{count}w{i:02d}", f"e{i % EXPERTS}") for i in range(count)]


def measure_shape(
    directory: Path, shape: str, *, seconds: float, min_sequential: int, clients: list[int]
) -> dict[str, Any]:
    """Sequential latency and 1/10/30-client throughput, coordinator vs FLOOR."""
    out: dict[str, Any] = {"shape": shape, "runs": {}}
    with (
        harness.server(directory / "coordinator", shape=shape, experts=EXPERTS) as coord,
        harness.server(directory / "floor", floor=True) as floor,
    ):
        schema, body_file, out["body_bytes"] = write_body(coord.url, directory)
        out["params"] = sum(_numel(shape) for shape in schema["tensors"].values())
        out["tensors"] = len(schema["tensors"])

        def load(url: str, count: int, mode: str, tag: str, **kw: Any) -> harness.LoadResult:
            harness.progress(f"speed {shape}: {tag} ({count} clients)")
            result = harness.run_load(
                url,
                _workers(count),
                procs=count,
                seconds=seconds,
                body_file=body_file,
                directory=directory / f"load-{tag}",
                mode=mode,
                schema=schema,
                **kw,
            )
            if not result.records:
                raise RuntimeError(f"{tag}: no successful upload; first errors {result.errors[:3]}")
            return result

        for count in clients:
            minimum = min_sequential if count == 1 else 0
            out["runs"][("coordinator", count)] = load(
                coord.url, count, "coordinator", f"c{count}", min_count=minimum
            )
            out["runs"][("floor", count)] = load(
                floor.url, count, "floor", f"f{count}", min_count=minimum
            )
            if count == 1:
                out["runs"][("floor-http-only", 1)] = load(
                    floor.url, 1, "floor", "f1-nowrite", min_count=minimum, write=0
                )
        out["memory"] = harness.proc_memory(coord.pid)
    return out


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def sequential_row(label: str, out: dict[str, Any]) -> dict[str, Any]:
    """Median/p90 latency of sequential uploads, coordinator vs FLOOR."""
    runs = out["runs"]
    coord = runs[("coordinator", 1)].latencies()
    floor = runs[("floor", 1)].latencies()
    http_only = runs[("floor-http-only", 1)].latencies()
    c50, f50 = harness.percentile(coord, 50), harness.percentile(floor, 50)
    return {
        "adapter": label,
        "params": out["params"],
        "body_bytes": out["body_bytes"],
        "uploads": len(coord),
        "coordinator_p50_ms": 1e3 * c50,
        "coordinator_p90_ms": 1e3 * harness.percentile(coord, 90),
        "floor_p50_ms": 1e3 * f50,
        "floor_http_only_p50_ms": 1e3 * harness.percentile(http_only, 50),
        "ratio": c50 / f50,
    }


def throughput_rows(label: str, out: dict[str, Any], clients: list[int]) -> list[dict[str, Any]]:
    """Updates/s and latency per client count, coordinator vs FLOOR."""
    rows = []
    for count in clients:
        coord, floor = out["runs"][("coordinator", count)], out["runs"][("floor", count)]
        rows.append(
            {
                "adapter": label,
                "clients": count,
                "coordinator_rate": coord.rate,
                "floor_rate": floor.rate,
                "ratio": coord.rate / max(floor.rate, 1e-9),
                "coordinator_p50_ms": 1e3 * harness.percentile(coord.latencies(), 50),
                "floor_p50_ms": 1e3 * harness.percentile(floor.latencies(), 50),
                "errors": len(coord.errors) + len(floor.errors),
            }
        )
    return rows
