"""The worker's sync paths, driven in milliseconds by an in-memory coordinator and clock.

``FakeCoordinator`` implements ``SyncClient`` with the coordinator's update rule for one
worker per expert (θ ← θ + Δ, at most once per update id) and can be told how the next
upload fails. The adapter is a dict of small tensors whose values are exact in float32,
so every expected state below is compared with ``torch.equal``.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fedmoe.adapters import AdapterSchema, decode_adapter, schema_of
from fedmoe.aggregate import AdapterState, apply_update
from fedmoe.client import ApiError
from fedmoe.deltas import ExpertChanges
from fedmoe.schemas import RegistrationAck, UpdateAck
from fedmoe.state_digest import state_digest
from fedmoe.worker.job import WorkerJob
from fedmoe.worker.options import WorkerOptions
from fedmoe.worker.progress import WorkerStats
from fedmoe.worker.sync import Syncer
from fedmoe.worker.sync_seams import FatalSyncError, SyncIdentity, wait_for

A, B = "base_model.model.layer.lora_A.weight", "base_model.model.layer.lora_B.weight"
INITIAL = {A: torch.tensor([[1.0, 2.0], [3.0, 4.0]]), B: torch.zeros(2, 2)}
SHAPES = schema_of(INITIAL)


def clone(state: AdapterState) -> AdapterState:
    """A deep copy of ``state``."""
    return {key: tensor.clone() for key, tensor in state.items()}


def plus(state: AdapterState, value: float) -> AdapterState:
    """``state`` with ``value`` added to every element (exact for these small values)."""
    return {key: tensor + value for key, tensor in state.items()}


def assert_state(actual: AdapterState, expected: AdapterState) -> None:
    """Bit-for-bit equality of two adapter states."""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), (key, actual[key], expected[key])


class FakeClock:
    """Time moves only when someone sleeps (or a test calls ``advance``)."""

    def __init__(self) -> None:
        self.time = 1000.0

    def now(self) -> float:
        """The fake time."""
        return self.time

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> None:
        """Advance the fake time at once."""
        self.time += seconds

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass."""
        self.time += seconds


class FakeCoordinator:
    """An in-memory ``SyncClient``; ``faults`` says how the next uploads go wrong."""

    def __init__(self) -> None:
        self.state, self.version, self.run_id = clone(INITIAL), 0, "run-1"
        self.known: set[str] = set()
        self.registrations = 0
        self.acks: dict[str, UpdateAck] = {}
        self.received: list[tuple[str, AdapterState]] = []  # (update id, delta) per attempt
        self.faults: list[str] = []
        self.closed = False
        self.pulls = 0
        self.weight = 1.0  # server_lr · decay: what our updates are applied with
        self.wrong_digest = False  # acknowledge with a digest that matches nothing
        self.gate: threading.Event | None = None  # when set up, uploads wait for it
        self.others = 0  # other workers' updates each acknowledgement says are due
        self.waits: list[tuple[int | None, float]] = []  # (wait_for, wait) of each pull
        self.finals: list[bool] = []  # whether each upload attempt said it was the last

    def schema(self) -> dict[str, Any]:
        """Base model and tensor shapes."""
        return {"base_model": "tiny", "lora_config": {}, "tensors": SHAPES}

    def register(
        self, *, worker_id: str, specialty: str, fingerprint: str, lora_config: dict[str, Any]
    ) -> RegistrationAck:
        """Remember the worker."""
        self.known.add(worker_id)
        self.registrations += 1
        return RegistrationAck(
            worker_id=worker_id,
            specialty=specialty,
            expert_version=self.version,
            run_id=self.run_id,
        )

    def expert_adapter(self, name: str, schema: AdapterSchema) -> tuple[int, AdapterState]:
        """The newest version."""
        self.pulls += 1
        return self.version, clone(self.state)

    def expert_changes(
        self,
        name: str,
        schema: AdapterSchema,
        since: int,
        exclude: str | None = None,
        *,
        wait_for: int | None = None,
        wait: float = 0.0,
    ) -> ExpertChanges:
        """The full expert (this fake keeps no steps); the round's updates that the
        acknowledgement announced arrive while the caller waits for them."""
        self.waits.append((wait_for, wait))
        if wait_for is not None:
            for _ in range(wait_for - self.version):
                self.push({k: torch.full_like(v, 0.125) for k, v in self.state.items()})
        version, state = self.expert_adapter(name, schema)
        return ExpertChanges(version, state_digest(state), state=state, size=4 * 4 * 2)

    def push(self, delta: AdapterState) -> None:
        """Another worker's update moves the expert."""
        self.state, self.version = apply_update(self.state, delta, 1.0), self.version + 1

    def upload(
        self, expert: str, body: bytes, *, worker_id: str, update_id: str, **facts: Any
    ) -> UpdateAck:
        """Apply Δ once per update id; a fault may refuse the connection or lose the answer."""
        self.finals.append(bool(facts.get("final")))
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        fault = self.faults.pop(0) if self.faults else None
        if fault == "refused":
            raise httpx.ConnectError("[Errno 111] Connection refused")
        if worker_id not in self.known:
            raise ApiError(409, "unknown_worker", "register first")
        if fault == "stale":
            raise ApiError(409, "stale_update", "staleness over the bound")
        if fault == "unavailable":
            raise ApiError(503, "storage_unavailable", "disk full")
        delta = decode_adapter(body, SHAPES)
        self.received.append((update_id, delta))
        if update_id not in self.acks:
            self.state = apply_update(self.state, delta, self.weight)
            self.version += 1
            digest = "0" * 64 if self.wrong_digest else state_digest(self.state)
            self.acks[update_id] = UpdateAck(
                update_id=update_id,
                expert=expert,
                version=self.version,
                staleness=0,
                weight=self.weight,
                update_norm=0.0,
                clipped=False,
                gateway_version=self.version,
                replayed=False,
                state_sha256=digest,
                active_workers=1 + self.others,
                settle_version=self.version + self.others,
            )
        if fault == "lost_answer":
            raise httpx.ReadTimeout("timed out")
        return self.acks[update_id]

    def close(self) -> None:
        """Nothing to release."""
        self.closed = True


def syncer_body(coordinator: FakeCoordinator) -> bytes:
    """The bytes of the last upload, re-encoded as the worker sent them (float32 here)."""
    from fedmoe.adapters import encode_adapter

    return encode_adapter(coordinator.received[-1][1])


class FakeAdapter:
    """An ``AdapterSlot`` over a dict; ``train`` adds an exact amount to every element."""

    def __init__(self) -> None:
        self.tensors = {key: torch.full_like(t, 99.0) for key, t in INITIAL.items()}

    def state(self) -> AdapterState:
        """A copy of the tensors."""
        return clone(self.tensors)

    def load(self, state: AdapterState) -> None:
        """Overwrite the tensors."""
        self.tensors = clone(state)

    def train(self, amount: float, tokens: int, stats: WorkerStats) -> None:
        """One fake step: the adapter moves by ``amount`` and the window counts it."""
        self.tensors = plus(self.tensors, amount)
        stats.steps += 1
        stats.tokens += tokens
        stats.window_tokens += tokens
        stats.window_losses.append(1.0)


@pytest.fixture
def world() -> tuple[Syncer, FakeCoordinator, FakeAdapter, FakeClock]:
    """A registered syncer that has pulled version 0."""
    coordinator, adapter, clock = FakeCoordinator(), FakeAdapter(), FakeClock()
    identity = SyncIdentity("w1", "python_expert", "fp", {}, SHAPES)
    syncer = Syncer(
        coordinator,
        adapter,
        identity,
        stats=WorkerStats(),
        clock=clock,
        sync_interval=10.0,
        max_backoff=30.0,
    )
    syncer.register()
    syncer.pull_and_reset()
    return syncer, coordinator, adapter, clock


def test_upload_is_the_delta_and_the_expert_equals_the_snapshot(world) -> None:
    syncer, coordinator, adapter, clock = world
    assert_state(adapter.tensors, INITIAL)  # pulled version 0
    adapter.train(0.5, 10, syncer.stats)
    adapter.train(0.25, 10, syncer.stats)
    snapshot = adapter.state()
    assert syncer.sync()
    ((_, delta),) = coordinator.received
    assert_state(delta, plus({k: torch.zeros_like(v) for k, v in INITIAL.items()}, 0.75))
    assert_state(coordinator.state, snapshot)
    assert_state(adapter.tensors, snapshot)  # nothing trained in flight: local == expert
    assert (syncer.base_version, syncer.stats.uploads, syncer.stats.window_tokens) == (1, 1, 0)
    assert syncer.next_sync_at == clock.now() + 10.0
    # ours was the only change: rebuilt from the acknowledgement, no download
    assert coordinator.pulls == 1 and syncer.stats.skipped_pulls == 1
    assert syncer.stats.bytes_down == 0 and syncer.stats.bytes_up == len(syncer_body(coordinator))


def test_connection_refused_drops_and_remakes_a_bigger_delta(world) -> None:
    syncer, coordinator, adapter, _ = world
    adapter.train(0.5, 10, syncer.stats)
    coordinator.faults = ["refused"]
    assert not syncer.sync()
    assert syncer.pending is None and coordinator.version == 0
    adapter.train(0.25, 5, syncer.stats)
    assert syncer.sync()
    ((update_id, delta),) = coordinator.received
    assert_state(delta, plus({k: torch.zeros_like(v) for k, v in INITIAL.items()}, 0.75))
    assert coordinator.acks[update_id].version == 1
    assert_state(coordinator.state, adapter.tensors)
    assert syncer.stats.failed_syncs == 1 and syncer.stats.window_tokens == 0


def test_unknown_fate_resends_the_same_id_and_keeps_inflight_steps(world) -> None:
    syncer, coordinator, adapter, _ = world
    adapter.train(0.5, 10, syncer.stats)
    snapshot = adapter.state()
    coordinator.faults = ["lost_answer"]  # applied, but the answer never came back
    assert not syncer.sync()
    assert syncer.pending is not None and syncer.pending.maybe_delivered
    adapter.train(0.25, 7, syncer.stats)  # trained while the upload's fate was unknown
    assert syncer.sync()
    (first_id, first), (second_id, second) = coordinator.received
    assert first_id == second_id
    assert_state(first, second)
    assert coordinator.version == 1  # applied once
    assert_state(coordinator.state, snapshot)
    assert_state(adapter.tensors, plus(snapshot, 0.25))  # the in-flight step survived
    assert syncer.stats.window_tokens == 7  # the in-flight step is the next window


def test_connection_refused_after_unknown_fate_keeps_the_update_id(world) -> None:
    syncer, coordinator, adapter, _ = world
    adapter.train(0.5, 10, syncer.stats)
    coordinator.faults = ["lost_answer", "refused"]
    assert not syncer.sync()
    pending = syncer.pending
    assert not syncer.sync()
    assert syncer.pending is pending  # it may have arrived the first time: never re-made
    assert syncer.sync()
    assert coordinator.version == 1


def test_transient_5xx_resends_the_same_update(world) -> None:
    syncer, coordinator, adapter, _ = world
    adapter.train(0.5, 10, syncer.stats)
    coordinator.faults = ["unavailable"]
    assert not syncer.sync()
    pending = syncer.pending
    assert pending is not None
    assert syncer.sync()
    assert coordinator.received[0][0] == pending.update_id and coordinator.version == 1


def test_unknown_worker_registers_again_and_resends(world) -> None:
    syncer, coordinator, adapter, _ = world
    adapter.train(0.5, 10, syncer.stats)
    coordinator.known.clear()  # the coordinator forgot us
    assert syncer.sync()  # a refusal handled in place, not a failed sync
    assert coordinator.registrations == 2 and coordinator.version == 0
    pending = syncer.pending
    assert pending is not None
    assert syncer.sync()
    assert coordinator.received[0][0] == pending.update_id
    assert_state(coordinator.state, adapter.tensors)


def test_refusal_rebases_onto_the_newest_expert(world) -> None:
    syncer, coordinator, adapter, _ = world
    adapter.train(0.5, 10, syncer.stats)
    other = {A: torch.tensor([[0.125, 0.0], [0.0, -0.5]]), B: torch.full((2, 2), 2.0)}
    coordinator.push(other)  # another worker moved the expert to v1
    coordinator.faults = ["stale"]
    assert syncer.sync()
    assert syncer.pending is None and syncer.stats.window_tokens == 0
    assert syncer.base_version == 1
    # our update is dropped: the expert is what the other worker made it, and we sit on it
    assert_state(adapter.tensors, coordinator.state)
    assert_state(syncer.pulled, coordinator.state)


def test_rebase_arithmetic_is_exact(world) -> None:
    syncer, coordinator, adapter, _ = world
    since = {A: torch.tensor([[1.0, 2.0], [3.0, 4.0]]), B: torch.tensor([[0.5, 0.0], [0.0, 1.0]])}
    adapter.load({A: since[A] + 0.25, B: since[B] - 0.75})  # progress +0.25 / -0.75
    coordinator.state = {A: torch.full((2, 2), 8.0), B: torch.full((2, 2), -2.0)}
    coordinator.version = 7
    syncer.pull_and_rebase(since=since)
    assert_state(adapter.tensors, {A: torch.full((2, 2), 8.25), B: torch.full((2, 2), -2.75)})
    assert syncer.base_version == 7
    assert_state(syncer.pulled, coordinator.state)


def test_a_replaced_coordinator_state_rebases_instead_of_resending(world) -> None:
    syncer, coordinator, adapter, _ = world
    adapter.train(0.5, 10, syncer.stats)
    coordinator.faults = ["lost_answer"]
    assert not syncer.sync()
    coordinator.__init__()  # a new run: empty state, version 0, forgot us
    coordinator.run_id = "run-2"
    assert syncer.sync()  # unknown_worker → register → a new run: re-pull
    assert syncer.pending is None
    assert_state(adapter.tensors, plus(INITIAL, 0.5))  # progress since the last pull kept


def test_forbidden_is_fatal(world) -> None:
    syncer, coordinator, adapter, _ = world
    adapter.train(0.5, 10, syncer.stats)

    def forbidden(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise ApiError(403, "forbidden", "not your worker id")

    coordinator.upload = forbidden  # type: ignore[method-assign]
    with pytest.raises(FatalSyncError):
        syncer.sync()


def test_backoff_doubles_up_to_the_bound_and_resets_after_success(world) -> None:
    syncer, coordinator, adapter, clock = world
    adapter.train(0.5, 10, syncer.stats)
    coordinator.faults = ["refused"] * 7
    waits = []
    for _ in range(7):
        assert not syncer.sync()
        waits.append(syncer.next_sync_at - clock.now())
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert syncer.sync() and syncer.backoff == 1.0


def test_flush_retries_with_the_clock_until_acknowledged(world) -> None:
    syncer, coordinator, adapter, clock = world
    adapter.train(0.5, 10, syncer.stats)
    coordinator.faults = ["refused", "lost_answer"]
    before = clock.now()
    syncer.flush(attempts=5)
    assert not syncer.has_unsent() and coordinator.version == 1
    assert clock.now() - before == 2.0 + 4.0  # the doubled backoffs, on the fake clock
    assert coordinator.finals == [True, True, True]  # each attempt says it is the last


def test_wait_for_retries_unavailability_but_not_refusals() -> None:
    clock, stop, calls = FakeClock(), threading.Event(), []

    def flaky() -> str:
        calls.append(clock.now())
        if len(calls) < 3:
            raise httpx.ConnectError("refused")
        return "ok"

    assert wait_for(flaky, clock=clock, stop=stop, max_backoff=30) == "ok"
    assert [t - calls[0] for t in calls] == [0.0, 1.0, 3.0]

    def refused() -> str:
        raise ApiError(409, "incompatible_worker", "other base model")

    with pytest.raises(ApiError):
        wait_for(refused, clock=clock, stop=stop, max_backoff=30)


def test_job_has_every_attribute_after_init_and_closes_its_client(tmp_path: Path) -> None:
    coordinator = FakeCoordinator()
    options = WorkerOptions(
        coordinator_url="http://127.0.0.1:9",
        worker_id="w1",
        specialty="python_expert",
        dataset=tmp_path / "unused.jsonl",
        ready_file=tmp_path / "ready.json",
    )
    job = WorkerJob(options, client=coordinator, clock=FakeClock())
    assert job.client is coordinator and job.syncer is None and job.trainer is None
    summary = job.cleanup()  # nothing set up: no upload, no evaluation, client closed
    assert coordinator.closed and summary["expert_version"] is None
    assert summary["steps"] == 0 and summary["seconds"] == 0.0 and coordinator.received == []


# --- incremental pulls -----------------------------------------------------------------------


def test_a_sole_worker_rebuilds_a_weighted_update_bit_for_bit(world) -> None:
    syncer, coordinator, adapter, _ = world
    coordinator.weight = 0.375  # server_lr · decay · clip: the expert moves by 0.375·Δ
    adapter.train(0.5, 10, syncer.stats)
    snapshot = adapter.state()
    assert syncer.sync()
    assert coordinator.pulls == 1 and syncer.stats.skipped_pulls == 1
    assert_state(syncer.pulled, coordinator.state)
    assert_state(adapter.tensors, coordinator.state)  # newest + (local − snapshot), nothing new
    assert_state(coordinator.state, plus(INITIAL, 0.1875))
    assert not torch.equal(snapshot[A], coordinator.state[A])


def test_another_update_in_between_means_a_full_pull(world) -> None:
    syncer, coordinator, adapter, _ = world
    adapter.train(0.5, 10, syncer.stats)
    other = {A: torch.full((2, 2), 0.25), B: torch.full((2, 2), -1.0)}
    coordinator.push(other)  # another worker's update lands before ours
    assert syncer.sync()
    assert coordinator.pulls == 2 and syncer.stats.skipped_pulls == 0
    assert syncer.stats.full_pulls == 1 and syncer.stats.bytes_down == 2 * 4 * 4
    assert_state(adapter.tensors, coordinator.state) and syncer.base_version == 2


def test_a_digest_mismatch_falls_back_to_a_full_pull(world) -> None:
    syncer, coordinator, adapter, _ = world
    coordinator.wrong_digest = True
    adapter.train(0.5, 10, syncer.stats)
    assert syncer.sync()
    assert syncer.stats.digest_mismatches == 1 and coordinator.pulls == 2
    assert_state(adapter.tensors, coordinator.state)


def test_an_acknowledgement_without_a_digest_means_a_full_pull(world) -> None:
    syncer, coordinator, adapter, _ = world
    original = coordinator.upload

    def old_coordinator(*args: Any, **kwargs: Any) -> UpdateAck:
        return original(*args, **kwargs).model_copy(update={"state_sha256": None})

    coordinator.upload = old_coordinator  # type: ignore[method-assign]
    adapter.train(0.5, 10, syncer.stats)
    assert syncer.sync() and coordinator.pulls == 2 and syncer.stats.skipped_pulls == 0


def test_bfloat16_upload_rounding_is_carried_into_the_next_delta(world) -> None:
    syncer, coordinator, adapter, _ = world
    syncer.identity = SyncIdentity("w1", "python_expert", "fp", {}, SHAPES, torch.bfloat16)
    adapter.train(1.0 / 3.0, 10, syncer.stats)  # not representable in bfloat16
    local = adapter.state()
    assert syncer.sync() and syncer.stats.skipped_pulls == 1
    assert_state(syncer.pulled, coordinator.state)  # the coordinator holds pulled + bf16(Δ)
    residual = {key: local[key] - coordinator.state[key] for key in local}
    assert any(bool(t.abs().sum() > 0) for t in residual.values())
    assert_state(adapter.tensors, {k: coordinator.state[k] + residual[k] for k in local})


# --- the background thread -------------------------------------------------------------------


def wait_done(syncer: Syncer) -> bool | None:
    """Poll until the background exchange is collected (as the training loop does)."""
    for _ in range(2000):
        result = syncer.poll()
        if result is not None:
            return result
        threading.Event().wait(0.005)
    raise AssertionError("the background sync never finished")


def test_training_goes_on_while_a_background_sync_is_in_flight(world) -> None:
    syncer, coordinator, adapter, _ = world
    coordinator.gate = threading.Event()
    adapter.train(0.5, 10, syncer.stats)
    snapshot = adapter.state()
    syncer.start()
    assert syncer.in_flight() and not syncer.due() and syncer.poll() is None
    with pytest.raises(RuntimeError, match="in flight"):
        syncer.start()  # at most one sync in flight
    adapter.train(0.25, 7, syncer.stats)  # the training thread goes on meanwhile
    assert syncer.poll() is None and syncer.has_unsent()
    coordinator.gate.set()
    assert wait_done(syncer) is True
    assert_state(coordinator.state, snapshot)  # the upload is the delta at capture time
    assert_state(adapter.tensors, plus(snapshot, 0.25))  # the in-flight step survived
    assert syncer.stats.window_tokens == 7 and syncer.stats.uploads == 1
    assert not syncer.in_flight() and coordinator.pulls == 1


def test_a_background_sync_pulls_once_the_round_is_in_and_an_inline_one_at_once(world) -> None:
    syncer, coordinator, adapter, _ = world
    syncer.pull_wait, coordinator.others = 2.0, 2  # K = 3: two more updates due this round
    adapter.train(0.5, 10, syncer.stats)
    snapshot = adapter.state()
    syncer.start()
    adapter.train(0.25, 7, syncer.stats)  # trained while the sync waits for the round
    assert wait_done(syncer) is True
    assert coordinator.waits == [(3, 2.0)]  # our version 1 + the 2 others, at most 2 s
    assert (syncer.stats.settled_pulls, syncer.stats.partial_rounds) == (1, 0)
    # the other two updates (0.125 each) are in the pulled expert; our progress is kept
    assert syncer.base_version == 3
    assert_state(adapter.tensors, plus(snapshot, 0.25 + 2 * 0.125))
    adapter.train(0.5, 10, syncer.stats)
    assert syncer.sync()  # inline (and the final upload): the training thread waits, so
    assert coordinator.waits == [(3, 2.0)]  # no wait: rebuilt from the acknowledgement
    coordinator.others, pulls = 0, coordinator.pulls  # a sole worker: nothing to wait for
    adapter.train(0.5, 10, syncer.stats)
    syncer.start()
    assert wait_done(syncer) is True
    assert coordinator.pulls == pulls and syncer.stats.skipped_pulls >= 1


def test_a_round_clock_puts_every_sync_on_its_boundaries(world) -> None:
    syncer, _, adapter, clock = world
    phase = [3.0]  # seconds on the shared clock; rounds of sync_interval = 10 s
    syncer.round_phase = lambda: phase[0]
    syncer.schedule_first()
    assert syncer.next_sync_at == clock.now() + 7.0  # the next boundary
    phase[0] = 18.0
    syncer.schedule_first()  # 2 s to the boundary: too short a first window, the one after
    assert syncer.next_sync_at == clock.now() + 12.0
    adapter.train(0.5, 10, syncer.stats)
    phase[0] = 30.4  # the sync ends 0.4 s into the round
    assert syncer.sync()
    assert syncer.next_sync_at == pytest.approx(clock.now() + 9.6)
    syncer.round_phase = None  # no shared clock: one interval after the sync
    assert syncer.sync() and syncer.next_sync_at == clock.now() + 10.0


def test_without_a_round_clock_syncs_keep_one_interval_however_long_each_takes(world) -> None:
    syncer, coordinator, adapter, clock = world
    syncer.schedule_first()
    assert syncer.next_sync_at == clock.now() + 10.0
    real_upload = coordinator.upload

    def slow_upload(*args: Any, **kwargs: Any) -> UpdateAck:
        clock.advance(3.0)  # a big adapter on a slow link
        return real_upload(*args, **kwargs)

    coordinator.upload = slow_upload  # type: ignore[method-assign]
    dues, starts = [], []
    for _ in range(4):
        dues.append(syncer.next_sync_at)
        while not syncer.due():  # training steps of 0.4 s until the sync is due
            adapter.train(0.1, 10, syncer.stats)
            clock.advance(0.4)
        starts.append(clock.now())
        syncer.start()
        assert wait_done(syncer) is True
    # each sync is due one interval after the one before (not 13 s: the 3 s exchange does
    # not stretch the period) and starts at the first step boundary from then
    assert [round(b - a, 6) for a, b in itertools.pairwise(dues)] == [10.0, 10.0, 10.0]
    assert all(0 <= start - due < 0.4 for due, start in zip(dues, starts))
    # a sync an interval or more late starts the cadence anew (no burst to catch up)
    clock.advance(25.0)
    adapter.train(0.1, 10, syncer.stats)
    late = clock.now()
    syncer.start()
    assert wait_done(syncer) is True and syncer.next_sync_at == late + 10.0


def test_background_unknown_fate_resends_the_same_id(world) -> None:
    syncer, coordinator, adapter, clock = world
    adapter.train(0.5, 10, syncer.stats)
    snapshot = adapter.state()
    coordinator.faults = ["lost_answer"]
    syncer.start()
    assert wait_done(syncer) is False
    adapter.train(0.25, 3, syncer.stats)
    assert not syncer.due()  # backoff
    clock.advance(1.0)
    syncer.start()
    assert wait_done(syncer) is True
    (first_id, _), (second_id, _) = coordinator.received
    assert first_id == second_id and coordinator.version == 1
    assert_state(adapter.tensors, plus(snapshot, 0.25))


def test_background_connection_refused_remakes_the_delta_and_fatal_errors_surface(world) -> None:
    syncer, coordinator, adapter, _ = world
    adapter.train(0.5, 10, syncer.stats)
    coordinator.faults = ["refused"]
    syncer.start()
    assert wait_done(syncer) is False and syncer.pending is None
    adapter.train(0.25, 5, syncer.stats)
    syncer.start()
    assert wait_done(syncer) is True
    assert_state(coordinator.received[-1][1], plus({k: v * 0 for k, v in INITIAL.items()}, 0.75))

    def forbidden(*args: Any, **kwargs: Any) -> UpdateAck:
        raise ApiError(403, "forbidden", "not your worker id")

    coordinator.upload = forbidden  # type: ignore[method-assign]
    adapter.train(0.25, 5, syncer.stats)
    syncer.start()
    with pytest.raises(FatalSyncError):
        wait_done(syncer)
    assert not syncer.in_flight()


def test_background_unknown_worker_registers_again(world) -> None:
    syncer, coordinator, adapter, _ = world
    adapter.train(0.5, 10, syncer.stats)
    coordinator.known.clear()
    syncer.start()
    assert wait_done(syncer) is True and coordinator.registrations == 2
    syncer.start()
    assert wait_done(syncer) is True and coordinator.version == 1
    assert_state(coordinator.state, adapter.tensors)


def test_flush_and_close_wait_for_the_sync_in_flight(world) -> None:
    syncer, coordinator, adapter, _ = world
    adapter.train(0.5, 10, syncer.stats)
    syncer.start()
    adapter.train(0.25, 5, syncer.stats)  # trained after the capture: the final upload sends it
    syncer.flush(attempts=5)  # waits for the one in flight first, then uploads inline
    syncer.close()
    assert not syncer.has_unsent() and coordinator.version == 2
    assert_state(coordinator.state, adapter.tensors)
    assert_state(adapter.tensors, plus(INITIAL, 0.75))
