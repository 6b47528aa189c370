"""FedAvg rounds inside the asynchronous rule (``fedmoe.fedavg_round``): hand-computed
weights, the close made anew from the round's start, rounds that end unclosed, and the
open round's state through its safetensors form."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch

from fedmoe import aggregate
from fedmoe.adapters import decode_adapter, encode_adapter
from fedmoe.client import CoordinatorClient
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.deltas import decode_steps, encode_steps, rebuild
from fedmoe.procs import start_coordinator, stop
from fedmoe.server_strategy import AsyncStrategy, ServerOptimizer
from fedmoe.strategy_state import Contribution, RoundClose, StrategyState
from tests import api_helpers as api

THETA = {"w": torch.tensor([1.0, 2.0, -3.0])}


def test_round_weights_share_the_applied_total_by_tokens_times_gain() -> None:
    assert aggregate.round_weights([0.5, 0.5], [100, 300], [1.0, 1.0]) == [0.25, 0.75]
    # the gains s(τ)·clip scale each share: 100·1 : 100·0.5, of a total of 1
    assert aggregate.round_weights([0.5, 0.5], [100, 100], [1.0, 0.5]) == pytest.approx(
        [2 / 3, 1 / 3], abs=1e-15
    )
    # only the total the round was applied with is shared out, not more
    assert sum(aggregate.round_weights([0.25, 0.25], [1, 3], [1.0, 1.0])) == 0.5
    # a token count unknown: shares follow the gains alone
    assert aggregate.round_weights([0.5, 0.5], [0, 300], [1.0, 1.0]) == [0.5, 0.5]
    # nothing to share by (every gain 0): the weights stay as applied
    assert aggregate.round_weights([0.0, 0.5], [10, 10], [0.0, 0.0]) == [0.0, 0.5]
    with pytest.raises(ValueError, match="as many"):
        aggregate.round_weights([0.5], [1, 2], [1.0])


def _update(uid: str, delta: list[float], *, base: int, stale: int, left: int, tokens: int):
    return Contribution(
        update_id=uid,
        delta={"w": torch.tensor(delta)},
        decay=1.0,
        clip=1.0,
        token_factor=1.0,
        active_workers=2,
        now=0.0,
        round_left=left,
        base_version=base,
        staleness=stale,
        num_tokens=tokens,
    )


def _rounds() -> AsyncStrategy:
    return AsyncStrategy(optimizer=ServerOptimizer(), server_lr="auto", rounds=True)


def test_a_complete_round_ends_bit_for_bit_where_a_fedavg_round_would() -> None:
    strategy = _rounds()
    first = _update("a", [0.1, 0.2, 0.3], base=0, stale=0, left=1, tokens=100)
    second = _update("b", [0.3, -0.1, 0.05], base=0, stale=1, left=0, tokens=300)
    opened = strategy.receive(THETA, first, StrategyState())
    # applied at once with η = 1/2, and the round holds θ_0 and the first delta
    assert opened.weight == 0.5 and opened.close is None
    assert torch.equal(opened.params["w"], THETA["w"] + 0.5 * first.delta["w"])
    assert opened.state.round_base == 0 and opened.state.round_params is THETA
    assert opened.state.round_members == (("a", 100, 1.0, 0.5),)
    closed = strategy.receive(opened.params, second, opened.state)
    fedavg = aggregate.apply_update(
        THETA, aggregate.weighted_average([first.delta, second.delta], [0.25, 0.75]), 1.0
    )
    assert torch.equal(closed.params["w"], fedavg["w"])
    assert closed.weight == 0.75 and closed.close == RoundClose(base=0, earlier=(("a", 0.25),))
    assert closed.state == StrategyState()  # nothing left open


def test_an_update_from_elsewhere_ends_the_round_as_applied() -> None:
    strategy = _rounds()
    opened = strategy.receive(
        THETA, _update("a", [1.0, 0.0, 0.0], base=4, stale=0, left=1, tokens=10), StrategyState()
    )
    # a straggler made from v2 (staleness 3): applied as always, and the round is over
    straggler = _update("s", [0.0, 1.0, 0.0], base=2, stale=3, left=0, tokens=10)
    after = strategy.receive(opened.params, straggler, opened.state)
    assert after.close is None and after.state.round_base is None
    assert torch.equal(after.params["w"], torch.tensor([1.5, 2.5, -3.0]))
    # the round's other update now closes nothing: plain θ + w·Δ
    late = _update("b", [0.0, 0.0, 1.0], base=4, stale=2, left=0, tokens=30)
    last = strategy.receive(after.params, late, after.state)
    assert last.close is None and last.weight == 0.5
    assert torch.equal(last.params["w"], torch.tensor([1.5, 2.5, -2.5]))


def test_without_rounds_or_for_a_lone_worker_nothing_is_kept() -> None:
    plain = AsyncStrategy(optimizer=ServerOptimizer(), server_lr="auto")
    update = _update("a", [1.0, 1.0, 1.0], base=0, stale=0, left=1, tokens=10)
    assert plain.receive(THETA, update, StrategyState()).state == StrategyState()
    alone = dataclasses.replace(update, round_left=0, active_workers=1)
    outcome = _rounds().receive(THETA, alone, StrategyState())
    assert outcome.state == StrategyState() and outcome.weight == 1.0
    with pytest.raises(ValueError, match="plain rule"):
        AsyncStrategy(optimizer=ServerOptimizer(kind="adam"), rounds=True)
    # a round left open by a run with rounds is not waited for by one without them
    opened = _rounds().receive(THETA, update, StrategyState()).state
    assert opened.round_base == 0
    assert plain.receive(THETA, update, opened).state == StrategyState()


def test_an_open_round_survives_its_safetensors_form_exactly() -> None:
    opened = _rounds().receive(
        THETA, _update("a", [0.1, 0.2, 0.3], base=7, stale=0, left=2, tokens=99), StrategyState()
    )
    state = opened.state
    back = StrategyState.from_parts(state.tensors(), state.scalars())
    assert (back.round_base, back.round_members) == (7, state.round_members)
    assert back.round_params is not None and torch.equal(back.round_params["w"], THETA["w"])
    assert torch.equal(back.round_deltas[0]["w"], state.round_deltas[0]["w"])
    assert not back.empty


@pytest.mark.heavy(6)
def test_a_round_half_done_at_kill_nine_closes_exactly_after_restart(tmp_path) -> None:
    """Over real HTTP: the first update of a round is acknowledged, the coordinator is
    killed, and after the restart the second one closes the round as FedAvg would, bit for
    bit (the incremental rebuild of a close: ``test_incremental_pull``)."""

    state, log, expert = tmp_path / "state", tmp_path / "coordinator.log", "sql_expert"
    coordinator, url = start_coordinator(state, log)
    port = int(url.rsplit(":", 1)[1])

    def send(client: CoordinatorClient, worker: str, uid: str, body: bytes, tokens: int):
        facts = {"worker_id": worker, "update_id": uid, "base_version": 0, "train_loss": 1.0}
        return client.upload(expert, body, num_tokens=tokens, **facts)

    try:
        with CoordinatorClient(url) as client:
            shapes, theta = api.register_workers(client, ("w1", "w2"), expert)
            as_lists = {k: list(s) for k, s in shapes.items()}
            bodies = [encode_adapter(api.random_delta(as_lists, seed)) for seed in (1, 2)]
            first = send(client, "w1", "a", bodies[0], 100)
            assert (first.version, first.weight, first.settle_version) == (1, 0.5, 2)
            assert client.status().experts[expert].strategy.round_fill == 1
        coordinator.kill()  # SIGKILL: no shutdown code runs
        coordinator.wait()
        coordinator, _ = start_coordinator(state, log, port=port)
        with CoordinatorClient(url) as client:
            assert client.status().experts[expert].strategy.round_fill == 1
            assert send(client, "w1", "a", bodies[0], 100) == first.model_copy(
                update={"replayed": True}
            )
            second = send(client, "w2", "b", bodies[1], 300)
            assert (second.version, second.weight) == (2, 0.75)
            assert client.status().experts[expert].strategy.round_fill == 0
            _, after = client.expert_adapter(expert, shapes)
    finally:
        stop(coordinator)
    deltas = [decode_adapter(body, shapes) for body in bodies]
    fedavg = aggregate.apply_update(theta, aggregate.weighted_average(deltas, [0.25, 0.75]), 1.0)
    assert all(torch.equal(after[key], fedavg[key]) for key in fedavg)


def test_steps_that_close_a_round_are_checked_and_rebuilt() -> None:

    schema = {"w": (3,)}
    first, second = {"w": torch.tensor([0.5, 0.0, 1.0])}, {"w": torch.tensor([1.0, 2.0, 0.0])}
    close = RoundClose(base=3, earlier=(("a", 0.25),))
    steps = [("a", 0.5, 4, encode_adapter(first), None), ("b", 0.75, 5, None, close)]
    _, decoded = decode_steps(encode_steps(3, 5, steps), schema)
    assert decoded[1].close == close
    rebuilt = rebuild(THETA, decoded, {"b": second}, since=3)
    expected = aggregate.weighted_average([first, second], [0.25, 0.75])
    assert torch.equal(rebuilt["w"], aggregate.apply_update(THETA, expected, 1.0)["w"])
    # a round that starts before the answer does: refused, not guessed
    early = [("b", 0.75, 5, encode_adapter(second), RoundClose(2, (("a", 0.25),)))]
    with pytest.raises(ValueError, match="starts at v2"):
        decode_steps(encode_steps(3, 5, [steps[0], *early]), schema)
    # ... or one whose earlier update the answer does not list
    orphan = [("b", 0.75, 5, encode_adapter(second), RoundClose(4, (("a", 0.25),)))]
    with pytest.raises(ValueError, match="not listed"):
        decode_steps(encode_steps(4, 5, orphan), schema)


def test_fedavg_rounds_set_where_they_cannot_apply_are_refused() -> None:

    assert CoordinatorSettings().rounds_apply  # the default
    assert not CoordinatorSettings(strategy="fedbuff").rounds_apply
    for bad in ({"strategy": "fedbuff"}, {"server_optimizer": "nesterov"}):
        with pytest.raises(ValueError, match="fedavg_rounds needs"):
            CoordinatorSettings(fedavg_rounds=True, **bad)


@pytest.mark.heavy(3)
def test_an_open_round_restored_from_its_snapshot_closes_exactly(
    live_coordinator_factory,
) -> None:
    """A snapshot taken while a round is open holds it (the expert at its start, its
    delta): reopened from that snapshot alone, the round's last update closes it as
    FedAvg would."""

    expert = "sql_expert"
    live = live_coordinator_factory(snapshot_every_updates=1)
    with live.client() as http:
        for worker in ("w1", "w2"):
            api.register(http, worker, expert)
        shapes = api.shapes_of(http)
        theta = api.expert_state(http, expert)
        bodies = [encode_adapter(api.random_delta(shapes, seed)) for seed in (5, 6)]
        first = api.update_headers("w1", 0, "a") | {"X-FedMoE-Num-Tokens": "30"}
        assert api.upload(http, expert, bodies[0], first).json()["settle_version"] == 2
    journal = live.coordinator.journal
    deadline = time.monotonic() + 60
    while journal.snapshot_lsns[expert] < 1:  # the background snapshot of version 1
        assert time.monotonic() < deadline, "no snapshot was written"
        time.sleep(0.05)
    live.stop()
    reopened = live_coordinator_factory(live.state_dir, snapshot_every_updates=1)
    # recovery starts from the snapshot of record 1, and no record follows it to replay
    assert reopened.coordinator.journal.snapshot_lsns[expert] == 1
    assert reopened.coordinator.journal.lsns[expert] == 1
    assert reopened.coordinator.strategies.states[expert].round_members[0][:2] == ("a", 30)
    with reopened.client() as http:
        second = api.update_headers("w2", 0, "b") | {"X-FedMoE-Num-Tokens": "10"}
        ack = api.upload(http, expert, bodies[1], second).json()
        assert (ack["version"], ack["weight"]) == (2, 0.25)
        after = api.expert_state(http, expert)
    deltas = [decode_adapter(body, {k: tuple(s) for k, s in shapes.items()}) for body in bodies]
    fedavg = aggregate.apply_update(theta, aggregate.weighted_average(deltas, [0.75, 0.25]), 1.0)
    assert all(torch.equal(after[key], fedavg[key]) for key in fedavg)


def test_fedmoe_status_shows_the_strategy_and_an_open_round(live_coordinator) -> None:

    with live_coordinator.client() as http:
        for worker in ("w1", "w2"):
            api.register(http, worker, "docs_expert")
        body = encode_adapter(api.random_delta(api.shapes_of(http), 1))
        api.upload(http, "docs_expert", body, api.update_headers("w1", 0, "a"))
    command = [sys.executable, "-m", "fedmoe", "status", "--coordinator-url"]
    shown = subprocess.run(
        [*command, live_coordinator.url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
        check=True,
    ).stdout
    (line,) = [row for row in shown.splitlines() if "docs_expert" in row and "round" in row]
    assert "async η auto round: 1 in" in line, shown
    assert shown.count("async η auto") == 3, shown  # every expert; the others hold nothing
