"""The write-ahead log of deltas: kill -9 at each named point of append, snapshot and
compaction loses no acknowledged update and applies none twice; replay is bit for bit
(also through FedBuff buffers and Adam moments); the archived log rebuilds an expert."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fedmoe.adapters import decode_adapter, encode_adapter
from fedmoe.aggregate import apply_update
from fedmoe.client import CoordinatorClient
from fedmoe.coordinator.bootstrap import open_coordinator, register_in_process
from fedmoe.coordinator.crashpoints import ENV
from fedmoe.coordinator.errors import StateDirError
from fedmoe.coordinator.replay import accepted_deltas
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.versions import UpdateRequest
from fedmoe.coordinator.wal import ExpertLog
from fedmoe.procs import start_coordinator, stop
from fedmoe.schemas import UpdateAck

pytestmark = pytest.mark.heavy(16)  # run early (tests/conftest.py)

SQL = "sql_expert"
FLAGS = ("--snapshot-every-updates", "2", "--snapshot-every-seconds", "3600")


class Sender:
    """One worker's staleness-0 bfloat16 uploads; remembers what was applied, in order."""

    def __init__(self, url: str) -> None:
        self.url, self.seed = url, 0
        self.applied: list[tuple[str, bytes]] = []  # (update id, body) in the order applied
        self.in_flight: tuple[str, bytes, int] | None = None
        with CoordinatorClient(url) as client:
            schema = client.schema()
            self.shapes = {k: tuple(v) for k, v in schema.tensors.items()}
            self.registration = {
                "fingerprint": schema.base_model_fingerprint,
                "lora_config": schema.lora_config,
            }
            _, self.initial = client.expert_adapter(SQL, self.shapes)

    def _send(self, client: CoordinatorClient, uid: str, body: bytes, base: int) -> UpdateAck:
        client.register(worker_id="w", specialty=SQL, **self.registration)
        return client.upload(
            SQL, body, worker_id="w", update_id=uid, base_version=base, num_tokens=1, train_loss=1.0
        )

    def until_killed(self, process: Any) -> None:
        """Upload new deltas until the coordinator dies; the last one's fate is unknown."""
        with CoordinatorClient(self.url, timeout=30) as client:
            while True:
                self.seed += 1
                generator = torch.Generator().manual_seed(self.seed)
                delta = {
                    k: torch.randn(s, generator=generator) * 1e-3 for k, s in self.shapes.items()
                }
                body = encode_adapter(delta, dtype=torch.bfloat16)
                uid = uuid.uuid4().hex
                self.in_flight = (uid, body, len(self.applied))
                try:
                    ack = self._send(client, uid, body, len(self.applied))
                except httpx.TransportError:
                    break
                assert (ack.staleness, ack.weight, ack.replayed) == (0, 1.0, False)
                self.applied.append((uid, body))
                self.in_flight = None
        assert process.wait(timeout=60) == -9, "the coordinator was not killed by its hook"

    def resend(self) -> UpdateAck:
        """Resend the upload whose fate the crash left unknown (same id, same bytes)."""
        assert self.in_flight is not None
        uid, body, base = self.in_flight
        with CoordinatorClient(self.url, timeout=30) as client:
            ack = self._send(client, uid, body, base)
        assert ack.version == len(self.applied) + 1
        self.applied.append((uid, body))
        self.in_flight = None
        return ack

    def expected(self) -> dict[str, torch.Tensor]:
        """The expert as the live rule makes it: θ ← θ + 1.0·Δ per applied upload, in order."""
        state = {k: v.clone() for k, v in self.initial.items()}
        for _, body in self.applied:
            state = apply_update(state, decode_adapter(body, self.shapes), 1.0)
        return state


def test_kill_nine_at_each_crash_point_loses_nothing_and_applies_nothing_twice(
    tmp_path: Path,
) -> None:
    state, log = tmp_path / "state", tmp_path / "coordinator.log"
    coordinator, url = start_coordinator(state, log, *FLAGS, env={ENV: "mid-append:3"})
    port = int(url.rsplit(":", 1)[1])
    try:
        sender = Sender(url)
        # a torn record: never acknowledged, cut off at start-up, so the resend is new
        sender.until_killed(coordinator)
        replayed = {}
        # after-append: durable, not acknowledged; the two snapshot points fire the second
        # time they are reached (the first is the start-up snapshot after a replay)
        for point in ("after-append:2", "mid-snapshot:2", "mid-compaction:2"):
            coordinator, _ = start_coordinator(state, log, *FLAGS, port=port, env={ENV: point})
            replayed[point] = sender.resend().replayed
            sender.until_killed(coordinator)
        coordinator, _ = start_coordinator(state, log, *FLAGS, port=port)
        last = sender.resend()
        with CoordinatorClient(url) as client:
            version, weights = client.expert_adapter(SQL, sender.shapes)
            ledger = [row for row in client.ledger(limit=1000) if row.expert == SQL]
    finally:
        stop(coordinator)
    assert replayed["after-append:2"] is False  # the torn mid-append record was not applied
    assert replayed["mid-snapshot:2"] is True  # the after-append record survived, once
    assert version == last.version == len(sender.applied) == len(ledger) >= 8
    assert sorted(r.update_id for r in ledger) == sorted(u for u, _ in sender.applied)
    expected = sender.expected()
    assert all(torch.equal(weights[k], expected[k]) for k in expected), "not bit for bit"
    # the archive keeps every retired segment: the whole history rebuilds the expert
    deltas = list(accepted_deltas(ExpertLog(state / "wal" / SQL, keep=True), sender.shapes))
    assert [d.row.update_id for d in deltas] == [u for u, _ in sender.applied]
    assert [d.row.expert_version for d in deltas] == list(range(1, version + 1))
    rebuilt = {k: v.clone() for k, v in sender.initial.items()}
    for item in deltas:
        rebuilt = apply_update(rebuilt, item.delta, item.row.weight)
    assert all(torch.equal(rebuilt[k], expected[k]) for k in expected)
    assert list((state / "wal" / SQL / "archive").glob("*.log"))


def _settings(state_dir: Path, **extra: Any) -> CoordinatorSettings:
    return CoordinatorSettings(
        host="127.0.0.1", state_dir=state_dir, experts=[SQL], auth_token=None, **extra
    )


def _submit(coordinator: Any, seed: int, worker: str, base: int) -> UpdateAck:
    generator = torch.Generator().manual_seed(seed)
    delta = {k: torch.randn(s, generator=generator) * 1e-2 for k, s in coordinator.schema.items()}
    body = encode_adapter(delta, dtype=torch.bfloat16)
    request = UpdateRequest(SQL, worker, f"u{seed}", base, 10 + seed, 1.0, body)
    return coordinator.submit_update(request)


@pytest.mark.parametrize(
    "extra",
    [
        {"strategy": "fedbuff", "buffer_size": 2, "server_optimizer": "adam"},
        {"server_optimizer": "nesterov", "token_weighting": True, "max_update_norm": 0.5},
        {"screen_min_workers": 1, "screen_history": 4},  # random deltas: some rejected
    ],
    ids=["fedbuff-adam", "nesterov-tokens-clip", "screen"],
)
def test_replay_after_a_crash_is_bit_for_bit(tmp_path: Path, extra: dict[str, Any]) -> None:
    settings = _settings(tmp_path, snapshot_every_updates=4, **extra)
    coordinator = open_coordinator(settings)
    for worker in ("a", "b"):
        register_in_process(coordinator, worker, SQL)
    acks = [  # stale bases too: every weight differs
        _submit(coordinator, seed, "ab"[seed % 2], max(0, coordinator.experts[SQL].version - 1))
        for seed in range(7)
    ]
    if "screen_history" in extra:  # replayed through rejections and acceptances
        assert {a.weight == 0.0 for a in acks} == {True, False}, acks
    before = coordinator.experts[SQL]
    buffered = coordinator.strategy_state(SQL)
    coordinator.close(snapshot=False)  # what kill -9 leaves: the log past the last snapshot
    reopened = open_coordinator(_settings(tmp_path, **extra))
    try:
        after = reopened.experts[SQL]
        assert after.version == before.version and after.digest == before.digest
        state = reopened.strategies.states[SQL]
        assert state.update_ids == buffered.update_ids and state.steps == buffered.steps
        assert (state.recent, state.verdicts) == (buffered.recent, buffered.verdicts)
        mine, theirs = state.tensors(), buffered.tensors()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert _submit(reopened, 2, "a", 0).replayed  # applied once, answered again
    finally:
        reopened.close()
    assert not list((tmp_path / "wal" / SQL).glob("*.log"))  # a clean close compacts


def test_torn_tail_is_cut_and_a_failed_commit_is_undone(tmp_path: Path) -> None:
    log = ExpertLog(tmp_path / "x", keep=False)
    for lsn in (1, 2):
        log.append({"lsn": lsn, "kind": "flush"}, b"")
    third = log.append({"lsn": 3, "kind": "flush"}, b"")
    log.undo(third)  # its ledger commit failed: it never happened
    segment = tmp_path / "x" / log.segments()[0]
    whole = segment.read_bytes()
    segment.write_bytes(whole + whole[: len(whole) // 3])  # half of a record: a crash
    assert [r.lsn for r in log.records()] == [1, 2]
    assert segment.read_bytes() == whole
    log.roll()
    log.append({"lsn": 3, "kind": "flush"}, b"")
    assert log.retire(2) == 1 and log.segments() == [f"{3:012d}.log"]
    assert not (tmp_path / "x" / "archive").exists()  # drop: deleted, not archived
    segment = tmp_path / "x" / log.segments()[0]
    segment.write_bytes(b"garbage" + segment.read_bytes())
    (tmp_path / "x" / f"{9:012d}.log").write_bytes(b"")
    with pytest.raises(StateDirError, match="damaged"):
        list(log.records())


def test_dropped_deltas_are_reported_by_the_history_reader(tmp_path: Path) -> None:
    coordinator = open_coordinator(_settings(tmp_path, delta_retention="drop"))
    register_in_process(coordinator, "a", SQL)
    for seed in range(3):
        _submit(coordinator, seed, "a", seed)
    coordinator.close()
    log = ExpertLog(tmp_path / "wal" / SQL, keep=False)
    assert not (tmp_path / "wal" / SQL / "archive").exists()
    assert list(accepted_deltas(log, coordinator.schema)) == []  # all compacted away
    reopened = open_coordinator(_settings(tmp_path, delta_retention="drop"))
    try:
        _submit(reopened, 9, "a", 3)
    finally:
        reopened.close(snapshot=False)
    with pytest.raises(ValueError, match="dropped"):
        list(accepted_deltas(log, reopened.schema))
