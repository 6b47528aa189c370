"""``realsize`` parts 2-4: acknowledgement latency against the FLOOR, memory, 30 workers.

* ``ack_latency``: sequential bfloat16 uploads of one size straight to the coordinator
  (loopback HTTP, no shaping), each followed at once by the same bytes to the FLOOR
  (the same HTTP stack, then one append + ``fsync``), so load on the machine hits both alike.
* ``memory``: a coordinator process with N 0.5B-sized experts after one update to each;
  nobody downloads the merged gateway, so it is never built (it is built on request).
* ``crowd``: 30 workers in a few ``benchmarks._load`` processes, each pushing a 0.5B-sized
  bf16 delta every ``interval`` seconds; then every acknowledgement must be in the ledger
  (``benchmarks._concurrency.verify``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks._concurrency import verify
from benchmarks._harness import percentile, proc_cpu_seconds, proc_memory, progress, run_load
from benchmarks._realsize_server import SHAPES, lora_shapes
from fedmoe.adapters import encode_adapter
from fedmoe.client import CoordinatorClient
from fedmoe.procs import start_server, stop

ROOT = Path(__file__).resolve().parent.parent
# seconds between timed uploads, off the clock: each one finds both servers idle (the
# coordinator finishes an update's strategy state after acknowledging it), as syncs
# seconds apart do, so neither server's leftover work lands in the other's timing
PAUSE = 0.2


@dataclass(frozen=True)
class Running:
    """A server subprocess: its URL, pid and state directory."""

    url: str
    pid: int
    state_dir: Path


@contextmanager
def realsize_server(
    directory: Path, size: str = "0.5B", *, experts: int = 1, floor: bool = False
) -> Iterator[Running]:
    """``benchmarks._realsize_server`` in ``directory`` (experts e0…), stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    log, url_file, state = directory / "server.log", directory / "server.url", directory / "state"
    names = ",".join(f"e{i}" for i in range(experts))
    command = [sys.executable, "-m", "benchmarks._realsize_server", "--url-file", str(url_file)]
    command += ["--state-dir", str(state), "--size", size, "--experts", names]
    command += ["--floor"] if floor else []
    process, url = start_server(command, url_file, log, timeout=300.0, cwd=ROOT)
    try:
        yield Running(url, process.pid, state)
    finally:
        stop(process)


def delta_body(size: str, seed: int = 1) -> bytes:
    """A random bfloat16 safetensors delta of ``size``'s LoRA shapes."""
    generator = torch.Generator().manual_seed(seed)
    delta = {
        key: torch.randn(shape, generator=generator) * 1e-3
        for key, shape in lora_shapes(SHAPES[size]).items()
    }
    return encode_adapter(delta, dtype=torch.bfloat16)


def _register(client: CoordinatorClient, worker_id: str, expert: str) -> int:
    schema = client.schema()
    ack = client.register(
        worker_id=worker_id,
        specialty=expert,
        fingerprint=schema.base_model_fingerprint,
        lora_config=schema.lora_config,
    )
    return ack.expert_version


def ack_latency(
    coordinator: Running, floor: Running, body: bytes, *, uploads: int
) -> dict[str, Any]:
    """Sequential uploads, coordinator then FLOOR in turn (``PAUSE`` apart), after one
    warm-up upload to each (not counted: the first touches fresh memory and files on both
    sides); latencies in seconds, each server process's CPU time per upload, and the
    machine's load around them."""
    coord_times: list[float] = []
    floor_times: list[float] = []
    load_before, cpu_before = os.getloadavg(), (0.0, 0.0)
    with (
        CoordinatorClient(coordinator.url, timeout=600.0) as client,
        httpx.Client(timeout=600) as raw,
    ):
        version = _register(client, "ack-probe", "e0")
        for index in range(-1, uploads):
            if index == 0:  # after the warm-up pair
                cpu_before = proc_cpu_seconds(coordinator.pid), proc_cpu_seconds(floor.pid)
            time.sleep(PAUSE)
            start = time.perf_counter()
            ack = client.upload(
                "e0",
                body,
                worker_id="ack-probe",
                update_id=f"ack-probe-{index}",
                base_version=version,
                num_tokens=1000,
                train_loss=1.0,
            )
            coord_times.append(time.perf_counter() - start)
            version = ack.version
            time.sleep(PAUSE)
            start = time.perf_counter()
            raw.post(f"{floor.url}/floor", content=body).raise_for_status()
            floor_times.append(time.perf_counter() - start)
    cpu = [proc_cpu_seconds(coordinator.pid), proc_cpu_seconds(floor.pid)]
    coord_times, floor_times = coord_times[1:], floor_times[1:]  # the warm-up pair
    coord, base = percentile(coord_times, 50), percentile(floor_times, 50)
    return {
        "body_bytes": len(body),
        "uploads": uploads,
        "warmup_uploads": 1,
        "coordinator_ms": [1e3 * t for t in coord_times],
        "floor_ms": [1e3 * t for t in floor_times],
        "coordinator_cpu_ms_per_upload": 1e3 * (cpu[0] - cpu_before[0]) / uploads,
        "floor_cpu_ms_per_upload": 1e3 * (cpu[1] - cpu_before[1]) / uploads,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "coordinator_p50_ms": 1e3 * coord,
        "coordinator_max_ms": 1e3 * max(coord_times),
        "floor_p50_ms": 1e3 * base,
        "floor_max_ms": 1e3 * max(floor_times),
        "ratio": coord / base,
    }


def memory(directory: Path, experts: int, body: bytes) -> dict[str, Any]:
    """RSS of a coordinator with ``experts`` 0.5B-sized experts, idle and after one update each."""
    progress(f"memory: {experts} experts of 0.5B size")
    with realsize_server(directory, "0.5B", experts=experts) as server:
        idle = proc_memory(server.pid)
        with CoordinatorClient(server.url, timeout=600.0) as client:
            for index in range(experts):
                name = f"e{index}"
                version = _register(client, f"m-{name}", name)
                client.upload(
                    name,
                    body,
                    worker_id=f"m-{name}",
                    update_id=f"m-{name}-0",
                    base_version=version,
                    num_tokens=1000,
                    train_loss=1.0,
                )
        time.sleep(1.0)  # let the store's writer settle
        after = proc_memory(server.pid)
    return {
        "experts": experts,
        "rss_idle_mib": idle["VmRSS"],
        "rss_after_mib": after["VmRSS"],
        "peak_rss_mib": after["VmHWM"],
    }


def crowd(
    directory: Path, body: bytes, *, workers: int, seconds: float, interval: float, procs: int
) -> dict[str, Any]:
    """``workers`` paced pushers on 3 experts for ``seconds``; latency and the ledger check."""
    progress(f"crowd: {workers} workers, one upload each per {interval:g} s, for {seconds:g} s")
    directory.mkdir(parents=True, exist_ok=True)
    body_file = directory / "delta.safetensors"
    body_file.write_bytes(body)
    load_before = os.getloadavg()
    with realsize_server(directory / "coordinator", "0.5B", experts=3) as server:
        schema: dict[str, Any] = httpx.get(server.url + "/v1/schema", timeout=60).json()
        result = run_load(
            server.url,
            [(f"w{i:02d}", f"e{i % 3}") for i in range(workers)],
            procs=procs,
            seconds=seconds,
            body_file=body_file,
            directory=directory / "load",
            schema=schema,
            interval=interval,
        )
        ok, checks, ledger = verify(server.url, server.state_dir, result)
        peak = proc_memory(server.pid)["VmHWM"]
    latencies = result.latencies()
    return {
        "workers": workers,
        "experts": 3,
        "seconds": seconds,
        "interval": interval,
        "procs": procs,
        "acks": len(result.records),
        "offered_rate": workers / interval,
        "rate": result.rate,
        "p50_ms": 1e3 * percentile(latencies, 50),
        "p99_ms": 1e3 * percentile(latencies, 99),
        "max_ms": 1e3 * max(latencies, default=float("nan")),
        "errors": len(result.errors),
        "ok": ok,
        "ledger": ledger,
        "checks": checks,
        "peak_rss_mib": peak,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
    }
