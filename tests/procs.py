"""Start real ``fedmoe`` processes for integration tests (coordinator, workers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedmoe.demo import free_port, wait_healthy

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_coordinator(
    state_dir: Path, log: Path, *extra: str, port: int | None = None
) -> tuple[subprocess.Popen, str]:
    """A coordinator subprocess on a free loopback port; returns (process, url) once healthy."""
    port = port or free_port()
    with open(log, "a") as handle:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedmoe",
                "coordinator",
                "--port",
                str(port),
                "--state-dir",
                str(state_dir),
                *extra,
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout=90)
    except RuntimeError:
        process.kill()
        raise RuntimeError(f"coordinator failed to start:\n{log.read_text()[-3000:]}") from None
    return process, url


def start_worker(
    url: str, worker_id: str, specialty: str, dataset: Path, log: Path, *extra: str
) -> subprocess.Popen:
    """A worker subprocess (one torch thread)."""
    with open(log, "a") as handle:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedmoe",
                "worker",
                "--coordinator-url",
                url,
                "--worker-id",
                worker_id,
                "--specialty",
                specialty,
                "--dataset",
                str(dataset),
                "--threads",
                "1",
                *extra,
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=ENV,
        )


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, bounded wait, then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
