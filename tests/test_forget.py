"""Removing a party (``fedmoe forget``): revocation, rebuild without its updates, crashes.

Real coordinators over real HTTP on loopback with real state dirs: the rebuilt expert is
compared bit for bit with a coordinator that only ever received the other workers'
updates, in the same order with the same weights (server_lr 1, staleness 0, equal
token counts, so every weight is the same on both).
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch

from fedmoe import procs
from fedmoe.adapters import encode_adapter
from fedmoe.client import CoordinatorClient
from fedmoe.procs import start_coordinator, stop
from fedmoe.schemas import ForgetRow
from tests.api_helpers import (
    PY,
    assert_error,
    expert_state,
    random_delta,
    registration_body,
    shapes_of,
    update_headers,
    upload,
)

pytestmark = pytest.mark.heavy(22)  # run early (tests/conftest.py)

ADMIN = "forget-admin-token-0123456789"
WORKERS = ("w1", "w2", "w3")
TOKENS = {worker: f"{worker}-token-0123456789abcdef" for worker in WORKERS}


@pytest.fixture
def tokens_file(tmp_path):
    entries = [{"token": ADMIN, "role": "admin"}]
    entries += [{"token": t, "role": "worker", "worker_id": w} for w, t in TOKENS.items()]
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": entries}))
    return path


def send(client: httpx.Client, worker: str, seed: int, *, token: str | None = None) -> dict:
    """Upload worker's seeded delta (bfloat16, as workers send) at the expert's current
    version (staleness 0)."""
    version = client.get("/v1/experts").json()
    base = next(e["version"] for e in version if e["name"] == PY)
    body = encode_adapter(random_delta(shapes_of(client), seed), dtype=torch.bfloat16)
    headers = update_headers(worker, base)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    response = upload(client, PY, body, headers)
    assert response.status_code == 200, response.text
    return response.json()


def register_all(client: httpx.Client, workers, tokens: dict[str, str] | None = None) -> None:
    for worker in workers:
        headers = {"Authorization": f"Bearer {tokens[worker]}"} if tokens else {}
        body = registration_body(client, worker, PY)
        response = client.post("/v1/workers", json=body, headers=headers)
        assert response.status_code == 200, response.text


def never_received(factory, sequence, **settings) -> dict[str, torch.Tensor]:
    """The expert of a coordinator that got only ``sequence`` ((worker, seed) pairs)."""
    live = factory(**settings)
    with live.client() as client:
        register_all(client, sorted({w for w, _ in sequence}))
        for worker, seed in sequence:
            send(client, worker, seed)
        return expert_state(client, PY)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_forget_rebuilds_without_the_worker_and_revokes_it(
    live_coordinator_factory, tokens_file
) -> None:
    live = live_coordinator_factory(tokens_file=tokens_file, server_lr=1.0)
    sequence = [("w1", 1), ("w2", 2), ("w3", 3), ("w1", 4), ("w2", 5), ("w3", 6)]
    with live.client(token=ADMIN) as admin:
        register_all(admin, WORKERS, TOKENS)
        acks = [send(admin, w, seed, token=TOKENS[w]) for w, seed in sequence]
        before = expert_state(admin, PY)
        stepped = admin.get(f"/v1/experts/{PY}/adapter", params={"since": 5})
        assert stepped.headers["X-FedMoE-Delta-From"] == "5"  # steps, before the forget
        gateway_before = admin.get("/v1/gateway").json()["version"]
        response = admin.post("/v1/workers/w2/forget")
        assert response.status_code == 200, response.text
        report = response.json()
        assert report["updates_removed"] == 2 and not report["already_forgotten"]
        (entry,) = report["experts"]
        assert (entry["expert"], entry["old_version"], entry["new_version"]) == (PY, 6, 7)
        assert entry["update_ids"] == [acks[1]["update_id"], acks[4]["update_id"]]
        assert report["gateway_version"] > gateway_before
        after = expert_state(admin, PY)
        pulled = admin.get(f"/v1/experts/{PY}/adapter")
        assert pulled.headers["X-FedMoE-Version"] == "7"  # workers see a new version
        # an incremental pull from before the rebuild gets the full expert, not steps
        since = admin.get(f"/v1/experts/{PY}/adapter", params={"since": 5})
        assert "X-FedMoE-Delta-From" not in since.headers and since.content == pulled.content
        assert not all(torch.equal(after[k], before[k]) for k in before)
        # the worker is gone: its token, its registration, and its id for good
        with live.client(token=TOKENS["w2"]) as revoked:
            assert_error(revoked.get("/v1/status"), 403, "worker_revoked", "w2")
            body = registration_body(admin, "w2", PY)
            assert_error(revoked.post("/v1/workers", json=body), 403, "worker_revoked")
        assert_error(
            admin.post("/v1/workers", json=registration_body(admin, "w2", PY)),
            409,
            "worker_forgotten",
        )
        assert "w2" not in admin.get("/v1/status").json()["workers"]
        # the others go on, on top of the rebuilt version
        send(admin, "w1", 7, token=TOKENS["w1"])
        assert_error(admin.post("/v1/workers/nobody/forget"), 404, "unknown_worker")
        again = admin.post("/v1/workers/w2/forget").json()
        assert again["already_forgotten"] and again["updates_removed"] == 0
        rows = admin.get("/v1/forgets").json()
        assert [(r["worker_id"], r["updates_removed"], r["new_version"]) for r in rows] == [
            ("w2", 2, 7)
        ]
        with live.client(token=TOKENS["w1"]) as worker:
            assert_error(worker.post("/v1/workers/w3/forget"), 403, "forbidden", "admin")
        final = expert_state(admin, PY)
    kept = [(w, s) for w, s in sequence if w != "w2"]
    assert_same(after, never_received(live_coordinator_factory, kept, server_lr=1.0))
    # a clean restart keeps everything: the rebuilt state (from its snapshot) and the revocation
    live.stop()
    again_live = live_coordinator_factory(live.state_dir, tokens_file=tokens_file, server_lr=1.0)
    with again_live.client(token=ADMIN) as admin:
        assert_same(expert_state(admin, PY), final)
    with again_live.client(token=TOKENS["w2"]) as revoked:
        assert_error(revoked.get("/v1/experts"), 403, "worker_revoked")


def test_a_second_forget_rebuilds_without_both(live_coordinator_factory) -> None:
    live = live_coordinator_factory(server_lr=1.0)
    with live.client() as client:
        register_all(client, WORKERS)
        acks = [send(client, w, seed) for w, seed in [("w1", 1), ("w2", 2), ("w3", 3)]]
        assert client.post("/v1/workers/w1/forget").json()["updates_removed"] == 1
        acks += [send(client, "w3", 4), send(client, "w2", 5)]
        report = client.post("/v1/workers/w3/forget").json()
        (entry,) = report["experts"]
        assert entry["update_ids"] == [acks[2]["update_id"], acks[3]["update_id"]]
        assert (entry["old_version"], entry["new_version"]) == (6, 7)
        rebuilt = expert_state(client, PY)
    assert_same(
        rebuilt, never_received(live_coordinator_factory, [("w2", 2), ("w2", 5)], server_lr=1.0)
    )


def test_a_forget_cut_short_before_its_record_can_be_run_again(live_coordinator_factory) -> None:
    """A crash after the pending row, before the log record (simulated by writing the row
    and closing as a crash would): start-up drops the row, the worker stays revoked."""
    live = live_coordinator_factory(server_lr=1.0)
    with live.client() as client:
        register_all(client, ["w1", "w2"])
        send(client, "w1", 1)
        send(client, "w2", 2)
    forgetting = live.coordinator.forgetting
    forgetting.book.revoke("w2")
    row = {"expert": PY, "old_version": 2, "new_version": 3, "lsn": 3, "updates_removed": 1}
    row |= {"update_ids": ["x"], "seq": 0, "worker_id": "w2", "created_at": 0.0}
    forgetting.book.begin(ForgetRow(**row))  # what a forget writes before its log record
    live.stop()
    again = live_coordinator_factory(live.state_dir, server_lr=1.0)
    with again.client() as client:
        assert client.get("/v1/forgets").json() == []
        assert_error(
            client.post("/v1/workers", json=registration_body(client, "w2", PY)),
            409,
            "worker_forgotten",
        )
        report = client.post("/v1/workers/w2/forget").json()
        assert report["already_forgotten"] and report["updates_removed"] == 1
        rebuilt = expert_state(client, PY)
    assert_same(rebuilt, never_received(live_coordinator_factory, [("w1", 1)], server_lr=1.0))


def test_fedbuff_keeps_other_workers_buffered_updates(live_coordinator_factory) -> None:
    settings = {"strategy": "fedbuff", "buffer_size": 2, "buffer_timeout": 3600.0}
    settings["server_lr"] = 1.0
    live = live_coordinator_factory(**settings)
    sequence = [("w2", 1), ("w1", 2), ("w2", 3), ("w3", 4), ("w1", 5)]
    with live.client() as client:
        register_all(client, WORKERS)
        acks = [send(client, w, seed) for w, seed in sequence]
        assert acks[-1]["buffered"]  # w1's last update waits in the buffer
        report = client.post("/v1/workers/w2/forget").json()
        assert report["updates_removed"] == 2
        strategy = client.get("/v1/status").json()["experts"][PY]["strategy"]
        assert strategy["buffered_update_ids"] == [acks[-1]["update_id"]]
        rebuilt = expert_state(client, PY)
        send(client, "w3", 6)  # fills the buffer: w1's buffered update is applied now
        applied = expert_state(client, PY)
    kept = [(w, s) for w, s in sequence if w != "w2"]
    assert_same(rebuilt, never_received(live_coordinator_factory, kept, **settings))
    both = never_received(live_coordinator_factory, [*kept, ("w3", 6)], **settings)
    assert_same(applied, both)


def test_forget_is_refused_when_the_log_was_dropped(live_coordinator_factory) -> None:
    live = live_coordinator_factory(delta_retention="drop", snapshot_every_updates=1)
    with live.client() as client:
        register_all(client, WORKERS)
        for seed, worker in enumerate(WORKERS):
            send(client, worker, seed)
        first = live.state_dir / "wal" / PY / "000000000001.log"
        wait_until(lambda: not first.exists())  # the background snapshot retired it
        before = client.get("/v1/status").json()
        response = client.post("/v1/workers/w1/forget")
        assert_error(response, 409, "log_unavailable", "delta_retention=drop")
        after = client.get("/v1/status").json()
        assert after["experts"] == before["experts"] and "w1" in after["workers"]
        register_all(client, ["w1"])  # not revoked: nothing changed


def test_worker_without_contribution_is_only_revoked(live_coordinator_factory) -> None:
    live = live_coordinator_factory()
    with live.client() as client:
        register_all(client, ["w1"])
        report = client.post("/v1/workers/w1/forget").json()
        assert report == {
            "worker_id": "w1",
            "revoked": True,
            "already_forgotten": False,
            "experts": [],
            "updates_removed": 0,
            "gateway_version": 0,
        }
        assert_error(
            client.post("/v1/workers", json=registration_body(client, "w1", PY)),
            409,
            "worker_forgotten",
        )


def test_kill_minus_nine_after_forget_recovers_the_same_state(tmp_path, monkeypatch) -> None:
    state, log = tmp_path / "state", tmp_path / "coordinator.log"
    # dies once the rebuild's log record is fsynced, before SQLite or the snapshot saw it
    monkeypatch.setitem(procs.ENV, "FEDMOE_TEST_CRASH_AT", "after-forget-append")
    process, url = start_coordinator(state, log, "--server-lr", "1.0")
    port = int(url.rsplit(":", 1)[1])
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            register_all(client, WORKERS)
            initial, shapes = expert_state(client, PY), shapes_of(client)
            deltas = {
                w: {k: v.to(torch.bfloat16).float() for k, v in random_delta(shapes, i).items()}
                for i, w in enumerate(WORKERS)
            }
            for seed, worker in enumerate(WORKERS):
                send(client, worker, seed)
            with pytest.raises(httpx.TransportError):
                client.post("/v1/workers/w2/forget")
        process.wait(timeout=30)
        monkeypatch.delitem(procs.ENV, "FEDMOE_TEST_CRASH_AT")
        process, _ = start_coordinator(state, log, "--server-lr", "1.0", port=port)
        with CoordinatorClient(url) as client:
            assert next(e.version for e in client.experts() if e.name == PY) == 4
            (row,) = client.forgets()  # its pending row was settled from the log at start-up
            assert (row.worker_id, row.updates_removed, row.new_version) == ("w2", 1, 4)
        # ... and w2's upload purged from the archived log then (fedmoe.coordinator.purge)
        w2_body = encode_adapter(random_delta(shapes, 1), dtype=torch.bfloat16)
        assert w2_body not in b"".join(p.read_bytes() for p in (state / "wal").rglob("*.log"))
        with httpx.Client(base_url=url, timeout=30) as client:
            want = {k: (initial[k] + deltas["w1"][k]) + deltas["w3"][k] for k in initial}
            assert_same(expert_state(client, PY), want)
            assert_error(
                client.post("/v1/workers", json=registration_body(client, "w2", PY)),
                409,
                "worker_forgotten",
            )
            again = client.post("/v1/workers/w2/forget").json()
            assert again["already_forgotten"] and again["experts"] == []
    finally:
        stop(process)


def test_cli_forget(live_coordinator_factory) -> None:
    live = live_coordinator_factory(auth_token=ADMIN)
    with live.client() as client:
        register_all(client, ["w1", "w2"])
        send(client, "w1", 1)
        send(client, "w2", 2)
    command = [sys.executable, "-m", "fedmoe", "forget", "--worker", "w1"]
    command += ["--coordinator-url", live.url, "--auth-token", ADMIN]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "worker w1 revoked; 1 update(s) removed" in done.stdout
    assert f"{PY}: v2 -> v3, 1 update(s) removed" in done.stdout
    refused = subprocess.run(
        [*command[:-2], "--auth-token", "not-the-admin-token-0123"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "401" in refused.stderr


def wait_until(condition, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)
