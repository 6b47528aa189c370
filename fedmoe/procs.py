"""Start, watch and stop real ``fedmoe`` processes: one harness for the demo, tests and benchmarks.

A coordinator is started on port 0 with ``--url-file``: it binds a free port itself and
writes the URL it got, so no two processes race for a port picked in advance. Every
process is stopped by its own pid: SIGTERM, a bounded wait, SIGKILL only as a last resort.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

# One torch thread per process and unbuffered logs: several processes share a few cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (only for a port that must be named
    up front, e.g. to a shell script; it can be taken before it is used)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(log: Path | None, chars: int = 3000) -> str:
    """The end of a process's log, for error messages."""
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-chars:]


def spawn(
    command: list[str],
    log: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command`` with its output appended to ``log`` (the harness's environment,
    plus ``env``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=ENV | (env or {}), cwd=cwd
        )


def wait_healthy(
    url: str, process: subprocess.Popen[Any], timeout: float = 120.0, log: Path | None = None
) -> None:
    """Poll ``/healthz`` until it answers 200; fail early, with the log, if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"process exited with code {process.returncode} before {url} was healthy\n"
                + log_tail(log)
            )
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy in {timeout:.0f}s\n" + log_tail(log))


def wait_for_json(
    path: Path, process: subprocess.Popen[Any], timeout: float = 120.0, log: Path | None = None
) -> dict[str, Any]:
    """The JSON a process writes (by rename) to ``path`` once it is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        if process.poll() is not None:
            raise RuntimeError(
                f"process exited with code {process.returncode} before writing {path}\n"
                + log_tail(log)
            )
        time.sleep(0.05)
    raise RuntimeError(f"no {path} after {timeout:.0f}s\n" + log_tail(log))


def stop(process: subprocess.Popen[Any], grace: float = 30.0) -> None:
    """SIGTERM this process (by its pid), wait up to ``grace`` seconds, then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_server(
    command: list[str],
    url_file: Path,
    log: Path,
    *,
    timeout: float = 120.0,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server that writes ``{"url": ...}`` to ``url_file``; return it once healthy."""
    url_file.unlink(missing_ok=True)
    process = spawn(command, log, cwd=cwd, env=env)
    try:
        url = str(wait_for_json(url_file, process, timeout, log)["url"])
        wait_healthy(url, process, timeout, log)
    except BaseException:
        stop(process, grace=5)
        raise
    return process, url


def start_coordinator(
    state_dir: Path,
    log: Path,
    *extra: str,
    port: int = 0,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """``fedmoe coordinator`` (port 0: one it picks itself); (process, url) once healthy.

    Give ``port`` only to restart a coordinator where its workers already look for it;
    ``env`` adds environment variables (tests: ``FEDMOE_TEST_CRASH_AT``).
    """
    url_file = log.with_name(log.name + ".url")
    command = [sys.executable, "-m", "fedmoe", "coordinator", "--port", str(port)]
    command += ["--state-dir", str(state_dir), "--url-file", str(url_file), *extra]
    return start_server(command, url_file, log, timeout=timeout, env=env)


def start_worker(
    url: str, worker_id: str, specialty: str, dataset: Path, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """``fedmoe worker`` with one torch thread."""
    command = [sys.executable, "-m", "fedmoe", "worker", "--coordinator-url", url]
    command += ["--worker-id", worker_id, "--specialty", specialty, "--dataset", str(dataset)]
    return spawn([*command, "--threads", "1", *extra], log)
