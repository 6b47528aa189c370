"""The quick command reference, run through the shell scripts and root entry points themselves.

Every process is real: ``scripts/start_coordinator.sh`` and ``scripts/start_worker.sh``
detach a coordinator and a worker (own session, pid files and logs in a temporary
directory), ``scripts/status.sh`` and ``get_gateway_model.py`` talk to them over HTTP and
``scripts/stop_all.sh`` ends them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedmoe.procs import free_port

pytestmark = pytest.mark.heavy(16)  # run early (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
FEDMOE = [sys.executable, "-m", "fedmoe"]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, never reaped in some containers, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def is_fedmoe(pid: int) -> bool:
    try:
        return alive(pid) and b"fedmoe" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Scripts:
    """Runs the scripts with pid files, logs and the coordinator port redirected to tmp."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.run_dir = tmp / "run"
        self.log_dir = tmp / "logs"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMOE_")}
        self.env = {
            **env,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "FEDMOE_CACHE_DIR": os.environ["FEDMOE_CACHE_DIR"],  # the session's (conftest)
            "FEDMOE_RUN_DIR": str(self.run_dir),
            "FEDMOE_LOG_DIR": str(self.log_dir),
            "FEDMOE_PORT": str(self.port),
            "FEDMOE_COORDINATOR_URL": self.url,
            "FEDMOE_START_TIMEOUT": "90",
            "FEDMOE_STOP_TIMEOUT": "30",
        }
        self.started: list[int] = []

    def run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a script (``name.sh`` under scripts/) or any command from the repo root."""
        argv = ["bash", str(SCRIPTS / command[0]), *command[1:]]
        if not command[0].endswith(".sh"):
            argv = list(command)
        result = subprocess.run(
            argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        self.remember_pids()
        return result

    def pid(self, name: str) -> int:
        return int((self.run_dir / f"{name}.pid").read_text())

    def remember_pids(self) -> None:
        for file in self.run_dir.glob("*.pid"):
            pid = int(file.read_text())
            if pid not in self.started and is_fedmoe(pid):
                self.started.append(pid)

    def cleanup(self) -> None:
        """stop_all.sh, then SIGKILL whatever fedmoe process this test started and is left."""
        try:
            subprocess.run(
                ["bash", str(SCRIPTS / "stop_all.sh")], env=self.env, timeout=90, check=False
            )
        finally:
            for pid in self.started:
                if is_fedmoe(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def scripts(tmp_path):
    runner = Scripts(tmp_path)
    try:
        yield runner
    finally:
        runner.cleanup()


def wait_for_version(scripts: Scripts, expert: str, timeout: float = 60) -> dict:
    """``status.sh --json`` (``fedmoe status --json``) once ``expert`` is at v1 or more.

    The wait polls over HTTP in this process (a CLI process per poll costs half a CPU
    second); the script is then run once and its answer must show the same.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            version = httpx.get(f"{scripts.url}/v1/status", timeout=10).json()["experts"][expert]
            if version["version"] >= 1:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            logs = (scripts.log_dir / "worker-Worker-1-Python.log").read_text()[-3000:]
            pytest.fail(f"{expert} never reached version 1\n{logs}")
        time.sleep(0.2)
    result = scripts.run("status.sh", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["experts"][expert]["version"] >= 1
    return data


def test_quick_command_reference(scripts: Scripts, tmp_path: Path) -> None:
    counts = ["--train-count", "60", "--validation-count", "10"]
    subprocess.run(
        [*FEDMOE, "make-demo-data", str(tmp_path / "data"), *counts],
        check=True,
        capture_output=True,
        env=scripts.env,
    )
    dataset = tmp_path / "data" / "python_expert" / "train.jsonl"
    assert dataset.exists()

    started = scripts.run(
        "start_coordinator.sh", "--port", str(scripts.port), "--state-dir", str(tmp_path / "state")
    )
    assert started.returncode == 0, started.stdout + started.stderr
    assert scripts.url in started.stdout
    coordinator = scripts.pid("coordinator")
    assert is_fedmoe(coordinator)
    assert (scripts.log_dir / "coordinator.log").exists()

    again = scripts.run("start_coordinator.sh", "--port", str(free_port()))
    assert again.returncode != 0 and "already running" in again.stderr
    assert scripts.pid("coordinator") == coordinator

    worker_flags = ["--worker-id", "Worker-1-Python", "--specialty", "python_expert"]
    worker_flags += ["--dataset", str(dataset), "--threads", "1", "--batch-size", "4"]
    started = scripts.run(
        "start_worker.sh",
        "--coordinator-url",
        scripts.url,
        *worker_flags,
        "--sync-interval",
        "2",
        "--slowdown",
        "3",  # leaves CPU to the other processes on a small machine
    )
    assert started.returncode == 0, started.stdout + started.stderr
    worker = scripts.pid("worker-Worker-1-Python")
    assert is_fedmoe(worker)
    assert "running (training)" in started.stdout  # seen through the worker's ready file
    ready = json.loads((scripts.run_dir / "worker-Worker-1-Python.ready").read_text())
    assert ready["pid"] == worker and ready["specialty"] == "python_expert"
    duplicate = scripts.run("start_worker.sh", *worker_flags)
    assert duplicate.returncode != 0 and "already running" in duplicate.stderr

    status = wait_for_version(scripts, "python_expert")
    assert "Worker-1-Python" in status["workers"]
    listing = scripts.run("status.sh")
    assert listing.returncode == 0, listing.stderr
    assert f"running  pid {coordinator}" in listing.stdout
    assert f"running  pid {worker}" in listing.stdout
    assert "python_expert" in listing.stdout

    adapter = tmp_path / "gateway"
    gateway = scripts.run(
        "python", "get_gateway_model.py", "--coordinator-url", scripts.url, "--output", str(adapter)
    )
    assert gateway.returncode == 0, gateway.stdout + gateway.stderr
    assert "gateway version" in gateway.stdout and "merge method cat" in gateway.stdout
    assert "python_expert: version" in gateway.stdout
    assert (adapter / "adapter_config.json").exists()
    assert (adapter / "adapter_model.safetensors").exists()

    stopped = scripts.run("stop_all.sh")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "SIGKILL" not in stopped.stdout
    assert not alive(worker) and not alive(coordinator)
    assert list(scripts.run_dir.glob("*.pid")) == []
    assert list(scripts.run_dir.glob("*.ready")) == []
    log = (scripts.log_dir / "worker-Worker-1-Python.log").read_text()
    assert "final upload" in log and "finished" in log


def test_bad_dataset_line_fails_the_start(scripts: Scripts, tmp_path: Path) -> None:
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    # a loaded machine can take over the default 30 s to import torch and reach the bad line
    scripts.env["FEDMOE_WORKER_CHECK_TIMEOUT"] = "150"
    result = scripts.run(
        "start_worker.sh",
        "--coordinator-url",
        scripts.url,
        "--worker-id",
        "W-bad",
        "--specialty",
        "python_expert",
        "--dataset",
        str(dataset),
        "--threads",
        "1",
        timeout=200,
    )
    assert result.returncode != 0
    assert f"{dataset}:2" in result.stdout + result.stderr
    assert not (scripts.run_dir / "worker-W-bad.pid").exists()


def test_worker_id_is_required(scripts: Scripts) -> None:
    result = scripts.run("start_worker.sh", "--specialty", "python_expert")
    assert result.returncode != 0 and "--worker-id is required" in result.stderr


def test_stop_scripts_leave_foreign_processes_alone(scripts: Scripts) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        scripts.run_dir.mkdir(parents=True)
        for name in ("coordinator", "worker-W1", "worker-W2"):
            (scripts.run_dir / f"{name}.pid").write_text(f"{sleeper.pid}\n")
        for command in (("stop_worker.sh", "--worker-id", "W1"), ("stop_coordinator.sh",)):
            result = scripts.run(*command)
            assert result.returncode == 0, result.stderr
            assert "stale pid file" in result.stdout
        result = scripts.run("stop_all.sh")
        assert result.returncode == 0, result.stderr
        assert sleeper.poll() is None  # still running: never signalled
        assert list(scripts.run_dir.glob("*.pid")) == []
    finally:
        sleeper.kill()
        sleeper.wait()
