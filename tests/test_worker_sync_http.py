"""The sync invariant end to end: a real tiny-model ``WorkerJob`` and a real coordinator.

With one worker per expert (staleness 0, weight 1) the upload is the delta from the pulled
expert (equal to the adapter captured at sync time minus the pulled expert up to the upload
dtype's rounding), after every acknowledged sync the coordinator's expert equals the
worker's snapshot (pulled + Δ as sent) bit for bit, the steps trained while an upload was
in flight (its answer lost, the same update id resent later) survive the rebase onto the
new expert, and a sole worker rebuilds the new expert from the acknowledgement instead of
downloading it. Both sync modes (inline, background thread) are checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fedmoe.adapters import decode_adapter, float32_bytes
from fedmoe.aggregate import AdapterState
from fedmoe.client import CoordinatorClient
from fedmoe.config import TrainSettings
from fedmoe.demo_data import write_demo_datasets
from fedmoe.modeling import adapter_state
from fedmoe.schemas import UpdateAck
from fedmoe.worker.job import WorkerJob
from fedmoe.worker.options import WorkerOptions

pytestmark = pytest.mark.heavy(17)  # run early (tests/conftest.py)

EXPERT = "python_expert"


def assert_same(actual: AdapterState, expected: AdapterState) -> None:
    """Bit-for-bit equality of two adapter states."""
    assert actual.keys() == expected.keys()
    different = [key for key in expected if not torch.equal(actual[key], expected[key])]
    worst = max(((actual[k] - expected[k]).abs().max().item() for k in different), default=0.0)
    assert not different, f"{len(different)} tensors differ (max {worst:.3g}), e.g. {different[:2]}"


class CheckingClient(CoordinatorClient):
    """The real client; after each acknowledgement it compares the expert with the snapshot.

    ``lose_answers`` names upload attempts (1-based) whose answer is dropped after the
    coordinator has applied them, as a timed-out response would be.
    """

    def __init__(self, url: str, *, lose_answers: tuple[int, ...] = ()) -> None:
        super().__init__(url)
        self.job: WorkerJob | None = None
        self.lose_answers, self.attempts, self.checked = lose_answers, 0, 0
        self.trained: dict[str, AdapterState] = {}  # update id -> adapter at its first attempt
        self.captured: AdapterState | None = None  # the adapter at the last sync's capture
        self.atol = 1e-6  # the upload dtype's rounding of Δ

    def watch_captures(self) -> None:
        """Record the adapter each sync captures (the training thread may go on after)."""
        assert self.job is not None and self.job.syncer is not None
        syncer = self.job.syncer
        capture = syncer.capture

        def recording() -> Any:
            taken = capture()
            if taken.local is not None:
                self.captured = {key: t.clone() for key, t in taken.local.items()}
            return taken

        syncer.capture = recording  # type: ignore[method-assign]

    def upload(self, expert: str, body: bytes, **kwargs: Any) -> UpdateAck:
        """Check the delta, upload for real, then check (or lose) the answer."""
        assert self.job is not None and self.job.syncer is not None and self.job.model
        syncer, update_id = self.job.syncer, kwargs["update_id"]
        if update_id not in self.trained:  # first attempt: the delta of what was captured
            assert self.captured is not None
            self.trained[update_id] = self.captured
            delta = decode_adapter(body, self.job.tensor_shapes)
            for key, tensor in delta.items():  # the delta, not the adapter: equal up to rounding
                expected = self.trained[update_id][key] - syncer.pulled[key]
                torch.testing.assert_close(tensor, expected, rtol=0, atol=self.atol)
        self.attempts += 1
        ack = super().upload(expert, body, **kwargs)
        if self.attempts in self.lose_answers:
            raise httpx.ReadTimeout("answer lost (test)")
        pending = syncer.pending
        assert pending is not None and pending.update_id == update_id
        version, expert_state = self.expert_adapter(expert, self.job.tensor_shapes)
        assert version == ack.version and ack.staleness == 0
        assert_same(expert_state, pending.snapshot)
        for key, tensor in pending.snapshot.items():
            torch.testing.assert_close(tensor, self.trained[update_id][key], rtol=0, atol=self.atol)
        self.checked += 1
        return ack


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small python_expert training set."""
    root = tmp_path_factory.mktemp("sync-data")
    return write_demo_datasets(root, train_count=40, validation_count=4)[EXPERT][0]


def make_job(url: str, dataset: Path, client: CheckingClient, **options: Any) -> WorkerJob:
    """A real tiny-model job using ``client`` (float32 uploads unless told otherwise)."""
    opts = WorkerOptions(
        coordinator_url=url,
        worker_id="w1",
        specialty=EXPERT,
        dataset=dataset,
        validation_fraction=0.0,
        train=TrainSettings(batch_size=2, max_length=256),
        **({"upload_dtype": "float32"} | options),
    )
    job = WorkerJob(opts, client=client)
    client.job = job
    return job


@pytest.mark.parametrize(
    ("sync_mode", "upload_dtype", "atol"),
    [("inline", "float32", 1e-6), ("background", "bfloat16", 2e-3)],
)
def test_every_acknowledged_sync_leaves_the_expert_equal_to_the_snapshot(
    live_coordinator, dataset: Path, sync_mode: str, upload_dtype: str, atol: float
) -> None:
    client = CheckingClient(live_coordinator.url, lose_answers=(2,))
    client.atol = atol
    job = make_job(
        live_coordinator.url,
        dataset,
        client,
        sync_interval=0.001,
        max_steps=8,
        sync_mode=sync_mode,
        upload_dtype=upload_dtype,
    )
    job.setup()
    client.watch_captures()
    try:  # the real loop (a sync after every step when none is in flight), the final upload
        job.train()
    finally:
        summary = job.cleanup()
    assert summary["sync_mode"] == sync_mode
    assert summary["uploads"] >= 3 and summary["failed_syncs"] == 1
    assert client.checked == summary["uploads"]
    reader = CoordinatorClient(live_coordinator.url)
    version, expert = reader.expert_adapter(EXPERT, job.tensor_shapes)
    reader.close()
    assert version == client.checked  # the resent update was applied once
    assert job.syncer is not None
    assert_same(job.syncer.pulled, expert)  # rebuilt from acknowledgements, yet exact
    stats = job.syncer.stats
    # a sole worker never downloads after its first pull: every new expert was rebuilt
    # from an acknowledgement (the replayed one too) and matched the coordinator's digest
    assert (stats.full_pulls, stats.digest_mismatches, summary["bytes_down"]) == (0, 0, 0)
    assert stats.skipped_pulls == summary["uploads"]
    per_upload = float32_bytes(job.tensor_shapes) // (2 if upload_dtype == "bfloat16" else 1)
    assert summary["bytes_up"] >= (summary["uploads"] + 1) * per_upload  # + the lost answer


def test_steps_trained_while_an_upload_is_in_flight_survive_the_rebase(
    live_coordinator, dataset: Path
) -> None:
    client = CheckingClient(live_coordinator.url, lose_answers=(2,))
    job = make_job(live_coordinator.url, dataset, client)
    job.setup()
    client.watch_captures()
    assert job.trainer is not None and job.syncer is not None and job.model is not None
    job.trainer.step()
    job.stats.window_tokens = 1
    assert job.sync()  # upload 1: acknowledged, checked
    job.trainer.step()
    assert not job.sync()  # upload 2 applied by the coordinator, but its answer is lost
    pending = job.syncer.pending
    assert pending is not None and pending.maybe_delivered
    for _ in range(2):  # trained while the upload's fate is unknown
        job.trainer.step()
    before = adapter_state(job.model)
    progress = {key: before[key] - pending.snapshot[key] for key in before}
    assert any(bool(t.abs().sum() > 0) for t in progress.values())
    assert job.sync()  # the same update id again: acknowledged once, then rebase
    version, expert = client.expert_adapter(EXPERT, job.tensor_shapes)
    assert version == 2
    after = adapter_state(job.model)
    assert_same(after, {key: expert[key] + progress[key] for key in expert})
    assert_same(job.syncer.pulled, expert)
    job.cleanup()
