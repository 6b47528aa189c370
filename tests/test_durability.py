"""Kill -9 the coordinator at random moments while clients upload; nothing acked is lost,
an acknowledged update resent after the restarts is answered again, not applied twice, and
a real worker trains on through the kills, a clean stop and a failing disk, uploading every
token it trained.

The worker trains with ``--slowdown``: what is tested is that it carries on through
outages, not how fast it trains, and the CPU is left to the coordinators."""

from __future__ import annotations

import contextlib
import functools
import json
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from fedmoe.adapters import encode_adapter
from fedmoe.client import ApiError, CoordinatorClient
from fedmoe.demo_data import write_demo_datasets
from fedmoe.procs import start_coordinator, start_worker, stop
from fedmoe.schemas import UpdateAck

pytestmark = pytest.mark.heavy(45)  # run early (tests/conftest.py)

EXPERTS = ("python_expert", "sql_expert")  # the uploaders'
DOCS = "docs_expert"  # the real worker's


class Uploader(threading.Thread):
    """Uploads seeded deltas at staleness 0, retrying each id until it is acknowledged."""

    def __init__(self, url: str, expert: str, fingerprint: str, lora: dict, shapes: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.expert, self.shapes = url, expert, shapes
        self.worker_id = f"uploader-{expert}"
        self.registration = {"fingerprint": fingerprint, "lora_config": lora}
        self.acked: list[tuple[str, bytes, dict, UpdateAck]] = []  # id, body, delta, ack
        self.stopping = threading.Event()
        self.rng = torch.Generator().manual_seed(EXPERTS.index(expert))

    def run(self) -> None:
        client = CoordinatorClient(self.url, timeout=10)
        version = 0
        self._retry(
            lambda: client.register(
                worker_id=self.worker_id, specialty=self.expert, **self.registration
            )
        )
        while not self.stopping.is_set():
            delta = {k: torch.randn(s, generator=self.rng) * 1e-3 for k, s in self.shapes.items()}
            update_id = uuid.uuid4().hex
            body = encode_adapter(delta)
            upload = functools.partial(
                client.upload,
                self.expert,
                body,
                worker_id=self.worker_id,
                update_id=update_id,
                base_version=version,
                num_tokens=1,
                train_loss=1.0,
            )
            ack = self._retry(upload)
            assert ack.staleness == 0 and ack.update_id == update_id
            version = ack.version
            self.acked.append((update_id, body, delta, ack))
        client.close()

    def _retry(self, call):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                return call()
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("coordinator did not come back in 120 s")


def test_kill_minus_nine_and_an_outage_lose_no_acknowledged_update_nor_trained_token(
    tmp_path,
) -> None:
    """Three kill -9 restarts while two uploaders and a real worker send updates, then a
    clean stop and a disk that fails for a while: the worker trains on through all of it."""
    state, log = tmp_path / "state", tmp_path / "coordinator.log"
    coordinator, url = start_coordinator(state, log)
    port = int(url.rsplit(":", 1)[1])
    data = write_demo_datasets(tmp_path / "data", train_count=40, validation_count=5)
    summary, worker_log = tmp_path / "summary.json", tmp_path / "worker.log"
    worker = None
    uploaders: list[Uploader] = []
    try:
        with CoordinatorClient(url) as client:
            schema = client.schema()
            shapes = {k: tuple(v) for k, v in schema.tensors.items()}
            initial = {e: client.expert_adapter(e, shapes)[1] for e in EXPERTS}
        worker = start_worker(
            url, "W-docs", DOCS, data[DOCS][0], worker_log,
            *("--sync-interval", "1", "--max-backoff", "2", "--max-seconds", "600"),
            *("--validation-fraction", "0", "--summary-json", str(summary), "--slowdown", "4"),
        )  # fmt: skip
        wait_for_version(url, DOCS, 1)  # the kills below should hit a working worker
        uploaders = [
            Uploader(url, e, schema.base_model_fingerprint, schema.lora_config, shapes)
            for e in EXPERTS
        ]
        for uploader in uploaders:
            uploader.start()
        rng = random.Random(7)
        for _ in range(3):
            time.sleep(rng.uniform(1.0, 3.0))
            coordinator.kill()  # SIGKILL: no shutdown handler runs
            coordinator.wait()
            coordinator, _ = start_coordinator(state, log, port=port)
        time.sleep(4)
        for uploader in uploaders:
            uploader.stopping.set()
        for uploader in uploaders:
            uploader.join(timeout=150)
        check_everything_acknowledged_is_there(url, uploaders, initial, shapes)
        check_resent_update_is_replayed(url, uploaders[0])
        assert worker.poll() is None, "the real worker died during coordinator restarts"
        seen = len(worker_log.read_text())
        stop(coordinator)  # a clean stop: down until the worker finds it unreachable
        wait_for_text(worker_log, "unreachable", after=seen)
        coordinator, _ = start_coordinator(state, log, port=port)
        # 503s until the disk is back: retried with the same id, not dropped. The outage
        # lasts until the worker has seen one, however slow this machine is.
        with broken_disk(state / "wal"):
            wait_for_text(worker_log, "storage_unavailable", after=seen)
        wait_for_version(url, DOCS, wait_for_version(url, DOCS, 0) + 1)  # after the outage
        worker.send_signal(signal.SIGTERM)  # stop: one final upload, then exit 0
        assert worker.wait(timeout=120) == 0
        result = json.loads(summary.read_text())
        assert result["failed_syncs"] >= 1 and result["unsent_tokens"] == 0
        with CoordinatorClient(url) as client:
            expert = client.status().experts[DOCS]
            worker_row = client.status().workers["W-docs"]
        assert expert.version == expert.updates_applied == result["uploads"]
        assert worker_row.tokens == result["tokens"]  # every trained token was uploaded
    finally:
        for uploader in uploaders:
            uploader.stopping.set()
        if worker is not None:
            stop(worker)
        stop(coordinator)


def check_everything_acknowledged_is_there(url, uploaders, initial, shapes) -> None:
    with CoordinatorClient(url) as client:
        status = client.status()
        ledger = client.ledger(limit=10000)
        accepted = {row.update_id for row in ledger if row.accepted}
        for uploader in uploaders:
            assert len(uploader.acked) >= 3, "uploads did not continue across restarts"
            ids = [update_id for update_id, *_ in uploader.acked]
            assert set(ids) <= accepted
            expert = status.experts[uploader.expert]
            assert expert.version == expert.updates_applied == len(ids)
            _, weights = client.expert_adapter(uploader.expert, shapes)
            expected = {k: v.clone() for k, v in initial[uploader.expert].items()}
            for _, _, delta, _ in uploader.acked:
                expected = {k: expected[k] + 1.0 * delta[k] for k in expected}
            for key in expected:
                torch.testing.assert_close(weights[key], expected[key], rtol=0, atol=1e-6)


def check_resent_update_is_replayed(url: str, uploader: Uploader) -> None:
    """The first acknowledged update, resent after three kill -9 restarts: the same answer,
    replayed, applied once; a new id with a base version from the future is still refused."""
    update_id, body, _, first = uploader.acked[0]
    with CoordinatorClient(url) as client:
        version = client.status().experts[uploader.expert].version
        resend = functools.partial(
            client.upload,
            uploader.expert,
            body,
            worker_id=uploader.worker_id,
            num_tokens=1,
            train_loss=1.0,
        )
        again = resend(update_id=update_id, base_version=0)
        assert again == first.model_copy(update={"replayed": True})
        assert client.status().experts[uploader.expert].version == version
        with pytest.raises(ApiError) as refused:
            resend(update_id="other-id", base_version=version + 5)
        assert refused.value.status_code == 422
        rows = [r for r in client.ledger(limit=10000) if r.update_id == update_id]
        assert len(rows) == 1 and json.loads(rows[0].response or "")["version"] == first.version


def wait_for_version(url: str, expert: str, version: int, timeout: float = 120) -> int:
    """Wait until ``expert`` is at ``version`` or newer; return its version."""
    deadline = time.monotonic() + timeout
    with CoordinatorClient(url) as client:
        while (current := client.status().experts[expert].version) < version:
            assert time.monotonic() < deadline, f"{expert} never reached version {version}"
            time.sleep(0.3)
    return current


def wait_for_text(path: Path, text: str, after: int = 0, timeout: float = 120) -> None:
    """Wait until the log at ``path`` contains ``text`` past its first ``after`` characters."""
    deadline = time.monotonic() + timeout
    while text not in (path.read_text()[after:] if path.exists() else ""):
        assert time.monotonic() < deadline, f"{path.name} never said {text!r}"
        time.sleep(0.3)


@contextlib.contextmanager
def broken_disk(directory: Path) -> Iterator[None]:
    """Make every write below ``directory`` (the write-ahead log) fail while inside (a file
    where the directory was)."""
    moved = directory.with_name(directory.name + ".away")
    directory.rename(moved)
    directory.write_text("not a directory: every write below it fails")
    try:
        yield
    finally:
        directory.unlink()
        moved.rename(directory)


def test_a_failing_disk_is_503_and_the_retry_applies_once(live_coordinator) -> None:
    """A write that fails (disk full, gone) changes nothing; the same id applies once later."""
    from tests.api_helpers import PY, PY_WORKER, delta_body, register, update_headers

    client = live_coordinator.client()
    register(client, PY_WORKER, PY)
    body = delta_body(client, 3)
    headers = update_headers(PY_WORKER, base_version=0)
    with broken_disk(live_coordinator.state_dir / "wal"):
        response = client.post(f"/v1/experts/{PY}/updates", content=body, headers=headers)
        experts = client.get("/v1/experts")
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "storage_unavailable"
    assert "nothing was applied" in response.json()["detail"]
    assert experts.json()[0] == {"name": PY, "version": 0}
    retried = client.post(f"/v1/experts/{PY}/updates", content=body, headers=headers)
    assert retried.status_code == 200, retried.text
    again = client.post(f"/v1/experts/{PY}/updates", content=body, headers=headers)
    assert again.json() == {**retried.json(), "replayed": True}
    assert client.get("/v1/experts").json()[0] == {"name": PY, "version": 1}
