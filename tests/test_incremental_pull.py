"""Incremental pulls over real HTTP: ``?since=V`` answers with the steps from V (or the full
expert when that is smaller, V too old, or the strategy is not θ + w·Δ), and a worker's
Syncer rebuilds the new expert from them bit for bit, checked by the state digest."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from fedmoe.adapters import encode_adapter
from fedmoe.client import CoordinatorClient
from fedmoe.deltas import rebuild
from fedmoe.state_digest import state_digest
from fedmoe.strategy_state import RoundClose
from fedmoe.worker.progress import WorkerStats
from fedmoe.worker.sync import Syncer
from fedmoe.worker.sync_seams import SyncIdentity, SystemClock
from tests.api_helpers import (
    PY,
    expert_state,
    random_delta,
    register,
    shapes_of,
    update_headers,
    upload,
)

ADAPTER = f"/v1/experts/{PY}/adapter"


def _bf16(shapes: dict[str, list[int]], seed: int) -> bytes:
    return encode_adapter(random_delta(shapes, seed), dtype=torch.bfloat16)


def _join(http, *workers: str) -> tuple[dict[str, list[int]], dict[str, tuple[int, ...]]]:
    """Register ``workers`` for the Python expert; its tensor shapes as JSON and as tuples."""
    for worker in workers:
        register(http, worker, PY)
    shapes = shapes_of(http)
    return shapes, {k: tuple(v) for k, v in shapes.items()}


def test_steps_since_a_version_rebuild_the_expert_bit_for_bit(live_coordinator) -> None:
    with live_coordinator.client() as http, CoordinatorClient(live_coordinator.url) as client:
        shapes, schema = _join(http, "w1", "w2")
        _, base = client.expert_adapter(PY, schema)
        mine = _bf16(shapes, 1)
        first = upload(http, PY, mine, update_headers("w1", 0, "mine")).json()
        # two registered workers: K = 2, η = 1/2; the round ends at version 2
        assert (first["weight"], first["active_workers"], first["settle_version"]) == (0.5, 2, 2)
        # staleness 1 is within the round (τ − (K−1) = 0): no decay; it completes the
        # round, which ends with FedAvg's token weights: 10 and 30 tokens, 1/4 and 3/4
        more = {"X-FedMoE-Num-Tokens": "30"}
        theirs = upload(http, PY, _bf16(shapes, 2), update_headers("w2", 0, "theirs", **more))
        assert theirs.json()["weight"] == 0.75
        changes = client.expert_changes(PY, schema, since=0, exclude="mine")
        assert (changes.version, changes.delta_from) == (2, 0) and changes.steps is not None
        assert [(s.update_id, s.delta is None) for s in changes.steps] == [
            ("mine", True),
            ("theirs", False),
        ]
        assert changes.size < len(mine) * 1.2  # one bfloat16 body, not the float32 expert
        own = {"mine": client_delta(mine, schema)}
        # "theirs" completed the round: the expert is v0 + the round's mean, made anew
        assert changes.steps[1].close == RoundClose(base=0, earlier=(("mine", 0.25),))
        rebuilt = rebuild(base, changes.steps, own, since=0)
        full = expert_state(http, PY)
        assert all(torch.equal(rebuilt[k], full[k]) for k in full)
        assert state_digest(rebuilt) == changes.digest
        current = client.expert_changes(PY, schema, since=2)
        assert current.steps == [] and current.delta_from == 2
        # two float32 bodies are bigger than the float32 expert: the full expert it is
        for seed in (3, 4):
            f32 = encode_adapter(random_delta(shapes, seed))
            assert upload(http, PY, f32, update_headers("w2", seed - 1)).status_code == 200
        whole = http.get(ADAPTER, params={"since": 2})
        assert "X-FedMoE-Delta-From" not in whole.headers
        assert whole.headers["X-FedMoE-State-Sha256"] == state_digest(expert_state(http, PY))
        for bad in ({"since": -1}, {"since": 2**63}, {"since": 0, "exclude": "bad id!"}):
            assert http.get(ADAPTER, params=bad).status_code == 422


def client_delta(body: bytes, schema: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    from fedmoe.adapters import decode_adapter

    return decode_adapter(body, schema)


def test_a_compacted_log_or_a_stateful_strategy_answers_in_full(live_coordinator_factory) -> None:
    live = live_coordinator_factory(snapshot_every_updates=1, delta_retention="drop")
    with live.client() as http:
        register(http, "w1", PY)
        shapes = shapes_of(http)
        assert upload(http, PY, _bf16(shapes, 1), update_headers("w1", 0)).status_code == 200
        deadline = time.monotonic() + 30
        while list((live.state_dir / "wal" / PY).glob("*.log")):  # the background snapshot
            assert time.monotonic() < deadline, "the log was never compacted"
            time.sleep(0.05)
        answer = http.get(ADAPTER, params={"since": 0})
        assert answer.status_code == 200 and "X-FedMoE-Delta-From" not in answer.headers
    momentum = live_coordinator_factory(server_optimizer="nesterov")
    with momentum.client() as http:
        register(http, "w1", PY)
        assert upload(http, PY, _bf16(shapes, 1), update_headers("w1", 0)).status_code == 200
        assert "X-FedMoE-Delta-From" not in http.get(ADAPTER, params={"since": 0}).headers


class Holder:
    """The adapter slot: a dict of tensors (the worker's model is not what is tested)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.tensors.items()}

    def load(self, state: dict[str, Any]) -> None:
        self.tensors = {k: v.clone() for k, v in state.items()}


def _live_syncer(
    client: CoordinatorClient, name: str, *, sync_interval: float, pull_wait: float = 0.0
) -> tuple[Syncer, Holder]:
    """A real ``Syncer`` for worker ``name`` of the Python expert over ``client``, training
    a ``Holder`` (bfloat16 uploads, the system clock)."""
    schema = client.schema()
    shapes = {k: tuple(v) for k, v in schema.tensors.items()}
    identity = SyncIdentity(
        name, PY, schema.base_model_fingerprint, schema.lora_config, shapes, torch.bfloat16
    )
    holder = Holder()
    syncer = Syncer(
        client,
        holder,
        identity,
        stats=WorkerStats(),
        clock=SystemClock(),
        sync_interval=sync_interval,
        max_backoff=1.0,
        pull_wait=pull_wait,
    )
    return syncer, holder


def test_a_worker_rebuilds_from_the_steps_when_another_update_came_between(
    live_coordinator,
) -> None:
    with live_coordinator.client() as http, CoordinatorClient(live_coordinator.url) as client:
        syncer, adapter = _live_syncer(client, "w1", sync_interval=1.0)
        syncer.register()
        syncer.pull_and_reset()
        register(http, "w2", PY)
        assert (
            upload(http, PY, _bf16(shapes_of(http), 7), update_headers("w2", 0)).status_code == 200
        )
        adapter.load({k: v + 0.01 for k, v in adapter.tensors.items()})  # "training"
        assert syncer.sync()
        stats = syncer.stats
        assert (stats.incremental_pulls, stats.full_pulls, stats.digest_mismatches) == (1, 0, 0)
        full = expert_state(http, PY)
        assert syncer.base_version == 2
        assert all(torch.equal(syncer.pulled[k], full[k]) for k in full)
        syncer.close()


def test_a_pull_waits_for_the_rounds_version_or_gives_up_after_wait(live_coordinator) -> None:
    with live_coordinator.client() as http, CoordinatorClient(live_coordinator.url) as client:
        shapes, schema = _join(http, "w1", "w2")
        first = upload(http, PY, _bf16(shapes, 1), update_headers("w1", 0, "one")).json()
        assert first["settle_version"] == 2
        with ThreadPoolExecutor(1) as pool:
            began = time.monotonic()
            pull = pool.submit(client.expert_changes, PY, schema, 0, "one", wait_for=2, wait=9.0)
            time.sleep(0.4)
            assert not pull.done()  # w2's update of the round is not in yet
            assert upload(http, PY, _bf16(shapes, 2), update_headers("w2", 0, "two")).is_success
            changes = pull.result(timeout=20)
        assert changes.version == 2 and 0.4 <= time.monotonic() - began < 10
        began = time.monotonic()
        late = client.expert_changes(PY, schema, 2, wait_for=9, wait=0.3)  # never comes
        assert late.version == 2 and 0.3 <= time.monotonic() - began < 5
        bad = http.get(f"/v1/experts/{PY}/adapter", params={"wait_for": 3, "wait": 10.5})
        assert bad.status_code == 422 and "wait" in bad.text


def test_a_worker_that_said_its_last_upload_no_longer_counts_as_active(live_coordinator) -> None:
    with live_coordinator.client() as http:
        shapes, _ = _join(http, "w1", "w2")
        first = upload(http, PY, _bf16(shapes, 1), update_headers("w1", 0, "a")).json()
        assert (first["active_workers"], first["weight"]) == (2, 0.5)
        leaving = update_headers("w2", 1, "b") | {"X-FedMoE-Final": "true"}
        assert upload(http, PY, _bf16(shapes, 2), leaving).json()["active_workers"] == 2
        # an update from before w2's last one (version 2) shares its round: w2 still counts
        same_round = upload(http, PY, _bf16(shapes, 5), update_headers("w1", 1, "e")).json()
        assert same_round["active_workers"] == 2
        alone = upload(http, PY, _bf16(shapes, 3), update_headers("w1", 3, "c")).json()
        # w2 stopped: w1 is the expert's only worker (η = 1, nobody else's update is due)
        assert (alone["active_workers"], alone["weight"], alone["settle_version"]) == (1, 1.0, 4)
        back = upload(http, PY, _bf16(shapes, 4), update_headers("w2", 4, "d")).json()
        assert back["active_workers"] == 2  # w2 is back: it counts again


def test_the_round_settles_at_the_version_its_last_update_makes(live_coordinator) -> None:
    with live_coordinator.client() as http:
        shapes, _ = _join(http, "w1", "w2", "w3")
        settles = [
            upload(http, PY, _bf16(shapes, i), update_headers(w, 0, f"r1-{w}")).json()
            for i, w in enumerate(("w2", "w1", "w3"))
        ]
        # all three pulled version 0: the round is in at version 3, whoever came first
        assert [(a["version"], a["settle_version"]) for a in settles] == [(1, 3), (2, 3), (3, 3)]
        nxt = upload(http, PY, _bf16(shapes, 7), update_headers("w1", 3, "r2-w1")).json()
        assert (nxt["version"], nxt["settle_version"]) == (4, 6)  # the next round: 2 to come


def test_two_background_workers_both_start_the_next_round_from_the_whole_round(
    live_coordinator,
) -> None:
    with (
        CoordinatorClient(live_coordinator.url) as one,
        CoordinatorClient(live_coordinator.url) as two,
    ):
        syncers, holders = [], []
        for name, client in (("w1", one), ("w2", two)):
            syncer, holder = _live_syncer(client, name, sync_interval=10.0, pull_wait=8.0)
            syncer.register()
            syncers.append(syncer)
            holders.append(holder)
        for index, (syncer, holder) in enumerate(zip(syncers, holders)):
            syncer.pull_and_reset()
            holder.load({k: v + 0.01 * (index + 1) for k, v in holder.tensors.items()})
        syncers[0].start()  # uploads, then waits for w2's update of the round
        time.sleep(0.5)
        assert syncers[0].in_flight() and syncers[0].poll() is None
        syncers[1].start()  # the round's last update: pulls at once
        for syncer in syncers:
            syncer.wait()
        with live_coordinator.client() as http:
            full = expert_state(http, PY)
        for syncer, holder in zip(syncers, holders):
            assert syncer.base_version == 2  # both: the expert with both updates in
            assert all(torch.equal(syncer.pulled[k], full[k]) for k in full)
            # the adapter too, up to the bfloat16 rounding of its delta (carried forward)
            assert all(torch.allclose(holder.tensors[k], full[k], atol=1e-3) for k in full)
        assert [s.stats.settled_pulls for s in syncers] == [1, 0]
        assert syncers[0].stats.partial_rounds == 0
        # w1 rebuilt the round's close (FedAvg rounds) from the steps, w2 its own last step
        assert [(s.stats.incremental_pulls, s.stats.digest_mismatches) for s in syncers] == [
            (1, 0),
            (1, 0),
        ]
        for syncer in syncers:
            syncer.close()
