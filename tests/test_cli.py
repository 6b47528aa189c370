"""The coordinator command refuses a bad start with one clear line and touches no state."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedmoe.procs import ENV

pytestmark = pytest.mark.heavy(2)  # run early (tests/conftest.py)


def _coordinator(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fedmoe", "coordinator", *args]
    env = {**ENV, "COLUMNS": "400"}  # rich wraps the message to the terminal width
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_a_busy_port_is_named_and_the_state_dir_is_not_created(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _coordinator("--port", str(port), "--state-dir", str(tmp_path / "state"))
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "state").exists()


def test_a_missing_base_model_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = _coordinator("--port", "0", "--state-dir", str(tmp_path), "--base-model", str(missing))
    assert result.returncode != 0
    assert f"base model '{missing}': no such directory" in result.stderr
