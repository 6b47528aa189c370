"""Process plumbing shared by the coordinator benchmarks: servers, load processes, stats.

Every subprocess is terminated in a ``finally``; servers bind port 0 themselves and
write the URL they got (``fedmoe.procs``, the harness the tests use too), so no two runs
race for a port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmoe.procs import start_server, stop

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    """A running server subprocess."""

    url: str
    pid: int
    log: Path


@dataclass
class LoadResult:
    """What the clients of one load run saw."""

    records: list[dict[str, Any]]
    errors: list[str]
    started: float
    finished: float
    clients: int
    procs: int
    loadavg: tuple[float, float, float] = field(default_factory=os.getloadavg)

    @property
    def elapsed(self) -> float:
        """Seconds from GO to the last acknowledgement."""
        return max(self.finished - self.started, 1e-9)

    @property
    def rate(self) -> float:
        """Acknowledgements per second."""
        return len(self.records) / self.elapsed

    def latencies(self) -> list[float]:
        """Acknowledgement latencies in seconds."""
        return [r["latency"] for r in self.records]


@contextmanager
def server(
    directory: Path,
    *,
    shape: str = "tiny",
    experts: int = 3,
    floor: bool = False,
    merge_method: str = "cat",
    fedmoe_root: Path | None = None,
) -> Iterator[Server]:
    """Start ``benchmarks._coordinator_server`` in ``directory`` and yield it once healthy.

    ``fedmoe_root``: a directory holding another version's ``fedmoe`` package (e.g. from
    ``git archive``), imported instead of this one (before/after comparisons).
    """
    directory.mkdir(parents=True, exist_ok=True)
    log, url_file = directory / "server.log", directory / "server.url"
    names = ",".join(f"e{i}" for i in range(experts))
    module = "benchmarks._coordinator_server"
    launcher = ["-m", module]
    if fedmoe_root is not None:
        code = f"import runpy, sys; sys.path.insert(0, {str(fedmoe_root)!r}); "
        launcher = ["-c", code + f"runpy.run_module({module!r}, run_name='__main__')"]
    command = [sys.executable, *launcher, "--url-file", str(url_file)]
    command += ["--state-dir", str(directory / "state"), "--shape", shape, "--experts", names]
    command += ["--merge-method", merge_method] + (["--floor"] if floor else [])
    process, url = start_server(command, url_file, log, timeout=180.0, cwd=ROOT)
    try:
        yield Server(url=url, pid=process.pid, log=log)
    finally:
        stop(process)


def run_load(
    url: str,
    workers: list[tuple[str, str]],
    *,
    procs: int,
    seconds: float,
    body_file: Path,
    directory: Path,
    mode: str = "coordinator",
    min_count: int = 0,
    schema: dict[str, Any] | None = None,
    write: int = 1,
    interval: float = 0.0,
) -> LoadResult:
    """Run ``len(workers)`` clients spread over ``procs`` ``benchmarks._load`` processes
    (back to back, or with ``interval`` > 0 one upload per client per ``interval`` seconds)."""
    directory.mkdir(parents=True, exist_ok=True)
    procs = max(1, min(procs, len(workers)))
    processes: list[subprocess.Popen] = []
    outputs = []
    try:
        for index in range(procs):
            spec = {
                "url": url,
                "mode": mode,
                "workers": workers[index::procs],
                "seconds": seconds,
                "min_count": min_count,
                "body_file": str(body_file),
                "write": write,
                "interval": interval,
                "fingerprint": (schema or {}).get("base_model_fingerprint"),
                "lora_config": (schema or {}).get("lora_config"),
                "out": str(directory / f"load{index}.json"),
            }
            spec_path = directory / f"spec{index}.json"
            spec_path.write_text(json.dumps(spec))
            outputs.append(Path(spec["out"]))
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks._load", str(spec_path)],
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=open(directory / f"load{index}.err", "wb"),  # noqa: SIM115
                    text=True,
                )
            )
        for index, process in enumerate(processes):
            if process.stdout.readline().strip() != "READY":
                process.wait(timeout=30)
                err = (directory / f"load{index}.err").read_text()[-3000:]
                raise RuntimeError(f"load process {index} failed to start:\n{err}")
        for process in processes:
            process.stdin.write("GO\n")
            process.stdin.flush()
        for index, process in enumerate(processes):
            if process.wait(timeout=seconds + 900) != 0:
                err = (directory / f"load{index}.err").read_text()[-3000:]
                raise RuntimeError(f"load process {index} exited {process.returncode}:\n{err}")
    finally:
        for process in processes:
            stop(process, grace=5)
    parts = [json.loads(path.read_text()) for path in outputs]
    records = [r for part in parts for r in part["records"]]
    return LoadResult(
        records=records,
        errors=[e for part in parts for e in part["errors"]],
        started=min(part["started"] for part in parts),
        finished=max([r["end"] for r in records] or [max(p["finished"] for p in parts)]),
        clients=len(workers),
        procs=procs,
    )


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def proc_memory(pid: int) -> dict[str, float]:
    """VmHWM (peak RSS) and VmRSS of ``pid`` in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0]) / 1024.0
    return values


def proc_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_T0 = time.monotonic()


def progress(message: str) -> None:
    """Print a progress line with the elapsed time to stderr."""
    print(f"[{time.monotonic() - _T0:6.1f} s] {message}", file=sys.stderr, flush=True)
