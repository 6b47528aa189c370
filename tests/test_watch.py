"""``fedmoe status --watch``: the live terminal view, run as a user runs it."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from fedmoe.client import CoordinatorClient
from fedmoe.watch import pause_until_interrupted, read_snapshot, render, watch
from tests.api_helpers import (
    PY,
    PY_WORKER,
    delta_body,
    eval_report,
    register,
    update_headers,
    upload,
)


def _federation(live) -> None:
    with live.client() as client:
        register(client, PY_WORKER, PY)
        assert upload(client, PY, delta_body(client, 3), update_headers()).status_code == 200
        upload(client, PY, b"junk", update_headers(base_version=1))
        report = eval_report(1.25, 2.5, tokens=10, examples=1, expert_version=1, gateway_version=1)
        assert client.post("/v1/metrics/evaluations", json=report).status_code == 200


def test_render_shows_experts_eval_losses_workers_and_refusals(live_coordinator) -> None:
    _federation(live_coordinator)
    with CoordinatorClient(live_coordinator.url) as client:
        snapshot = read_snapshot(client)
    console = Console(record=True, width=160)
    console.print(render(snapshot))
    text = console.export_text()
    for expected in (
        PY,
        "sql_expert",
        "docs_expert",
        PY_WORKER,
        "1.250",
        "2.500",
        "invalid_update",
    ):
        assert expected in text, (expected, text)


def test_watch_refreshes_until_interrupted(live_coordinator) -> None:
    _federation(live_coordinator)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the clock of the loop: change things, then Ctrl-C
        sleeps.append(seconds)
        if len(sleeps) == 1:
            with live_coordinator.client() as client:
                register(client, "late-worker", "sql_expert")
        else:
            raise KeyboardInterrupt

    with CoordinatorClient(live_coordinator.url) as client:
        watch(console, client, interval=2.5, sleep=sleep)
    frames = screen.getvalue().split("experts (federated validation loss")
    assert sleeps == [2.5, 2.5]
    assert len(frames) >= 3  # two refreshes (and the final frame)
    assert "late-worker" not in frames[1] and "late-worker" in frames[-1]


def test_status_watch_command_exits_cleanly_on_ctrl_c(live_coordinator) -> None:
    _federation(live_coordinator)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedmoe",
            "status",
            "--watch",
            "--interval",
            "0.3",
            "--coordinator-url",
            live_coordinator.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "160"},
        text=True,
    )
    deadline = time.monotonic() + 60
    with live_coordinator.client() as client:  # Ctrl-C once the loop has read the coordinator
        while 'route="/v1/metrics/rejections"' not in client.get("/metrics").text:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert PY in output and "2.500" in output and PY_WORKER in output, output


def test_ctrl_c_ends_the_watch_at_its_next_pause_and_twice_at_once() -> None:
    """The first SIGINT only stops the loop at its pause (never inside a request), a
    second one interrupts at once, and the previous handler is back afterwards."""
    before = signal.getsignal(signal.SIGINT)
    with pause_until_interrupted() as pause:
        pause(0.01)  # no interrupt: a plain pause
        os.kill(os.getpid(), signal.SIGINT)  # delivered here, between two statements
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            pause(30.0)
        assert time.monotonic() - started < 5.0
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second one: raised where it lands
            time.sleep(5.0)
    assert signal.getsignal(signal.SIGINT) is before
