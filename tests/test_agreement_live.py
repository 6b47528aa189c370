"""--server-lr agree over real HTTP: the agreement state (direction average and its count)
survives kill -9 exactly: the expert after the restart is the one an uninterrupted run of
the same rule computes, bit for bit."""

from __future__ import annotations

import pytest
import torch

from fedmoe.client import CoordinatorClient
from fedmoe.procs import start_coordinator, stop
from fedmoe.server_strategy import AsyncStrategy, Contribution, ServerOptimizer, StrategyState
from tests import api_helpers as api

pytestmark = pytest.mark.heavy(8)  # run early (tests/conftest.py)

SQL = "sql_expert"
FLAGS = ("--server-lr", "agree", "--no-screen-updates")  # the rule's own direction average


def _upload(client: CoordinatorClient, worker: str, uid: str, delta: dict, base: int) -> int:
    return api.upload_delta(client, SQL, worker, uid, delta, base).version


def test_kill_nine_keeps_the_agreement_state_exactly(tmp_path) -> None:
    state_dir, log = tmp_path / "state", tmp_path / "coordinator.log"
    coordinator, url = start_coordinator(state_dir, log, *FLAGS)
    port = int(url.rsplit(":", 1)[1])
    workers = ("w1", "w2", "w3", "w1")
    try:
        with CoordinatorClient(url) as client:
            shapes, theta = api.register_workers(client, workers[:3], SQL)
            as_lists = {k: list(s) for k, s in shapes.items()}
            common = api.random_delta(as_lists, 0)  # agreeing deltas: a shared part + noise
            deltas = [
                {k: common[k] + 0.5 * v for k, v in api.random_delta(as_lists, i).items()}
                for i in range(1, 5)
            ]
            for index, worker in enumerate(workers[:3]):
                assert _upload(client, worker, f"u{index}", deltas[index], index) == index + 1
        coordinator.kill()  # SIGKILL: no shutdown code runs
        coordinator.wait()
        coordinator, _ = start_coordinator(state_dir, log, *FLAGS, port=port)
        with CoordinatorClient(url) as client:
            assert _upload(client, "w1", "u3", deltas[3], 3) == 4
            _, after = client.expert_adapter(SQL, shapes)
            rows = {row.update_id: row for row in client.ledger()}
    finally:
        stop(coordinator)
    # the same four updates without a crash (τ = 0 each; all three registered: K = 3)
    strategy = AsyncStrategy(optimizer=ServerOptimizer(), server_lr="agree")
    expected, kept = theta, StrategyState()
    for index, active in enumerate((3, 3, 3, 3)):
        row = rows[f"u{index}"]
        contribution = Contribution(
            update_id=f"u{index}",
            delta=deltas[index],
            decay=1.0,
            clip=1.0,
            token_factor=1.0,
            active_workers=active,
            now=0.0,
            worker_id=workers[index],
            norm=row.update_norm,
        )
        outcome = strategy.receive(expected, contribution, kept)
        assert outcome.params is not None
        assert row.weight == pytest.approx(outcome.weight, rel=1e-12)
        expected, kept = outcome.params, outcome.state
    assert kept.folded == 4 and rows["u3"].weight > 1 / 3  # they agree: more than the mean
    for key in theta:
        assert torch.equal(after[key], expected[key]), key
