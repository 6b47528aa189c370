"""Server strategies over real HTTP: FedBuff acknowledges buffered updates durably, a
kill -9 with a half-full buffer loses and repeats nothing, and momentum resumes exactly."""

from __future__ import annotations

import time

import pytest
import torch

from fedmoe.adapters import encode_adapter
from fedmoe.client import CoordinatorClient
from fedmoe.procs import start_coordinator, stop
from fedmoe.server_strategy import ServerOptimizer, StrategyState
from tests import api_helpers as api
from tests.api_helpers import PY, PY_WORKER

pytestmark = pytest.mark.heavy(10)  # run early (tests/conftest.py)

SQL = "sql_expert"


def test_fedbuff_acknowledges_buffered_updates_and_applies_their_mean(
    live_coordinator_factory,
) -> None:
    live = live_coordinator_factory(strategy="fedbuff", buffer_size=2)
    with live.client() as client:
        api.register(client, PY_WORKER, PY)
        api.register(client, "py-2", PY)
        shapes = api.shapes_of(client)
        theta = api.expert_state(client, PY)
        first, second = api.random_delta(shapes, 1), api.random_delta(shapes, 2)
        headers = api.update_headers(PY_WORKER, 0, "first")
        ack = api.upload(client, PY, encode_adapter(first), headers).json()
        assert (ack["buffered"], ack["version"], ack["buffer_fill"]) == (True, 0, 1)
        again = api.upload(client, PY, encode_adapter(first), headers).json()
        assert again == ack | {"replayed": True}
        expert = client.get("/v1/status").json()["experts"][PY]
        assert expert["version"] == 0
        assert expert["strategy"]["buffer_fill"] == 1
        assert expert["strategy"]["buffered_update_ids"] == ["first"]
        headers = api.update_headers("py-2", 0, "2nd")
        ack = api.upload(client, PY, encode_adapter(second), headers).json()
        assert (ack["buffered"], ack["version"]) == (False, 1)
        after = api.expert_state(client, PY)
        for key in theta:
            expected = theta[key] + (first[key] + second[key]) / 2
            torch.testing.assert_close(after[key], expected, rtol=0, atol=1e-7)
        rows = {row["update_id"]: row for row in client.get("/v1/ledger").json()}
        assert rows["first"]["buffered"] and not rows["2nd"]["buffered"]
        assert client.get("/v1/status").json()["experts"][PY]["strategy"]["buffer_fill"] == 0


def _upload(client: CoordinatorClient, worker: str, uid: str, delta: dict, base: int):
    return api.upload_delta(client, SQL, worker, uid, delta, base)


def test_kill_nine_with_half_full_buffer_and_momentum_resumes_exactly(tmp_path) -> None:
    state, log = tmp_path / "state", tmp_path / "coordinator.log"
    flags = ("--strategy", "fedbuff", "--buffer-size", "2", "--server-optimizer", "nesterov")
    coordinator, url = start_coordinator(state, log, *flags)
    port = int(url.rsplit(":", 1)[1])
    try:
        with CoordinatorClient(url) as client:
            shapes, theta = api.register_workers(client, ("w1", "w2"), SQL)
            as_lists = {k: list(s) for k, s in shapes.items()}
            deltas = [api.random_delta(as_lists, i) for i in range(4)]
            _upload(client, "w1", "a", deltas[0], 0)
            assert _upload(client, "w2", "b", deltas[1], 0).version == 1  # step 1: momentum
            held = _upload(client, "w1", "c", deltas[2], 1)  # half-full buffer
            assert held.buffered and held.version == 1
        coordinator.kill()  # SIGKILL: no shutdown code runs
        coordinator.wait()
        coordinator, _ = start_coordinator(state, log, *flags, port=port)
        with CoordinatorClient(url) as client:
            strategy = client.status().experts[SQL].strategy
            assert strategy is not None
            assert (strategy.buffer_fill, strategy.buffered_update_ids) == (1, ["c"])
            assert strategy.optimizer_steps == 1
            replay = _upload(client, "w1", "c", deltas[2], 1)
            assert replay == held.model_copy(update={"replayed": True})  # not buffered twice
            assert _upload(client, "w2", "d", deltas[3], 1).version == 2
            _, after = client.expert_adapter(SQL, shapes)
    finally:
        stop(coordinator)
    # the same two Nesterov steps without a crash, bit for bit
    optimizer, expected, moments = (
        ServerOptimizer(kind="nesterov", momentum=0.9),
        theta,
        StrategyState(),
    )
    for pair in ((deltas[0], deltas[1]), (deltas[2], deltas[3])):
        buffer = {k: 1.0 * pair[0][k] + 1.0 * pair[1][k] for k in theta}
        grad = {k: (1.0 / 2.0) * v for k, v in buffer.items()}
        expected, moments = optimizer.step(expected, grad, 0.7, moments)
    for key in theta:
        assert torch.equal(after[key], expected[key]), key


def test_a_lone_update_is_applied_after_the_buffer_timeout(live_coordinator_factory) -> None:
    live = live_coordinator_factory(strategy="fedbuff", buffer_size=4, buffer_timeout=0.2)
    with live.client() as client:
        api.register(client, PY_WORKER, PY)
        shapes = api.shapes_of(client)
        theta, delta = api.expert_state(client, PY), api.random_delta(shapes, 3)
        headers = api.update_headers(PY_WORKER, 0, "x")
        ack = api.upload(client, PY, encode_adapter(delta), headers).json()
        assert ack["buffered"] and ack["version"] == 0
        deadline = time.monotonic() + 30  # the timer ticks every 0.05 s; a loaded machine lags
        while client.get("/v1/status").json()["experts"][PY]["version"] == 0:
            assert time.monotonic() < deadline, "the timed-out buffer was never applied"
            time.sleep(0.05)
        status = client.get("/v1/status").json()["experts"][PY]
        assert status["version"] == 1 and status["strategy"]["buffer_fill"] == 0
        after = api.expert_state(client, PY)
        for key in theta:  # a buffer of one: its mean is the delta itself
            torch.testing.assert_close(after[key], theta[key] + delta[key], rtol=0, atol=1e-7)
    live.stop()
    reopened = live_coordinator_factory(live.state_dir, strategy="fedbuff", buffer_size=4)
    assert reopened.coordinator.experts[PY].version == 1
    assert reopened.coordinator.strategies.states[PY].update_ids == ()
