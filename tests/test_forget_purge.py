"""``fedmoe forget`` purges the removed worker's raw deltas from the archived log; recovery
and later rebuilds stay exact (an in-process coordinator on a real state dir)."""

from __future__ import annotations

from pathlib import Path

import torch

from fedmoe.adapters import decode_adapter, encode_adapter
from fedmoe.aggregate import apply_update
from fedmoe.coordinator.bootstrap import open_coordinator, register_in_process
from fedmoe.coordinator.replay import accepted_deltas
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.versions import UpdateRequest
from fedmoe.coordinator.wal import ExpertLog

SQL = "sql_expert"


def _settings(state_dir: Path) -> CoordinatorSettings:
    return CoordinatorSettings(
        host="127.0.0.1",
        state_dir=state_dir,
        experts=[SQL],
        server_lr=1.0,
        snapshot_every_updates=2,  # segments are archived before the forget too
    )


def _send(coordinator, worker: str, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    delta = {k: torch.randn(s, generator=generator) * 1e-2 for k, s in coordinator.schema.items()}
    body = encode_adapter(delta, dtype=torch.bfloat16)
    base = coordinator.experts[SQL].version
    coordinator.submit_update(UpdateRequest(SQL, worker, f"{worker}-{seed}", base, 10, 1.0, body))
    return body


def _wal_bytes(state_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((state_dir / "wal").rglob("*")) if p.is_file())


def test_forget_purges_the_workers_deltas_and_recovery_and_rebuilds_stay_exact(
    tmp_path: Path,
) -> None:
    coordinator = open_coordinator(_settings(tmp_path))
    for worker in "abc":
        register_in_process(coordinator, worker, SQL)
    initial = {k: v.clone() for k, v in coordinator.initial.items()}
    sent = {w: [] for w in "abc"}  # type: dict[str, list[bytes]]
    for seed, worker in enumerate("abcba"):
        sent[worker].append(_send(coordinator, worker, seed))
    assert all(body in _wal_bytes(tmp_path) for body in sent["b"])
    coordinator.forgetting.forget("b")
    wal = _wal_bytes(tmp_path)
    assert not any(body in wal for body in sent["b"]), "a forgotten delta is still on disk"
    assert all(body in wal for body in sent["a"] + sent["c"])  # others' deltas are kept
    log = ExpertLog(tmp_path / "wal" / SQL, keep=True)
    purged = [r for r in log.all_records() if r.header.get("purged")]
    assert sorted(r.header["ledger"]["update_id"] for r in purged) == ["b-1", "b-3"]
    assert all(r.body == b"" for r in purged)
    kept = [d.row.update_id for d in accepted_deltas(log, coordinator.schema)]
    assert kept == ["a-0", "c-2", "a-4"]
    sent["a"].append(_send(coordinator, "a", 5))
    before = coordinator.experts[SQL]
    coordinator.close(snapshot=False)  # what kill -9 leaves: the log past the snapshot
    coordinator = open_coordinator(_settings(tmp_path))
    try:
        assert coordinator.experts[SQL].digest == before.digest  # recovered exactly
        coordinator.forgetting.forget("c")  # rebuilt from the purged archive
        want = initial
        for body in sent["a"]:  # a lone worker: applied with weight 1, never judged
            want = apply_update(want, decode_adapter(body, coordinator.schema), 1.0)
        got = coordinator.experts[SQL].state
        assert all(torch.equal(got[k], want[k]) for k in want), "not bit for bit"
        assert not any(body in _wal_bytes(tmp_path) for body in sent["b"] + sent["c"])
    finally:
        coordinator.close()
