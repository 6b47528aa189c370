"""Federated evaluation: a real worker measures the expert and gateway on its validation set,
the coordinator validates and keeps the reports durably and serves their history."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel

from fedmoe.batching import tokenize_examples
from fedmoe.client import CoordinatorClient
from fedmoe.config import LoraSettings
from fedmoe.data import load_examples
from fedmoe.demo_data import write_demo_datasets
from fedmoe.evaluation import validation_loss
from fedmoe.export import fetch_adapter_dir
from fedmoe.modeling import adapter_state, attach_lora, load_base_model
from fedmoe.worker.fed_eval import default_eval_every, swapped_lora
from fedmoe.worker.job import WorkerJob
from fedmoe.worker.options import WorkerOptions
from tests.api_helpers import PY, PY_WORKER, SQL, assert_error, eval_report, register

pytestmark = pytest.mark.heavy(6)  # run early (tests/conftest.py)

TOKEN = "observe-admin-token-0123456789"
W_TOKEN = "observe-worker-token-0123456789"


@pytest.fixture
def live(live_coordinator_factory, tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "tokens": [
                    {"token": TOKEN, "role": "admin"},
                    {"token": W_TOKEN, "role": "worker", "worker_id": PY_WORKER},
                ]
            }
        )
    )
    return live_coordinator_factory(state_dir=tmp_path / "state", tokens_file=tokens)


def test_reports_are_validated_stored_and_filtered(live) -> None:
    with live.client(TOKEN) as admin, live.client(W_TOKEN) as worker:
        register(admin, PY_WORKER, PY)
        register(admin, "sql-w", SQL)
        stored = worker.post("/v1/metrics/evaluations", json=eval_report())
        assert stored.status_code == 200, stored.text
        assert [row["kind"] for row in stored.json()] == ["expert", "gateway"]
        sql = eval_report(worker_id="sql-w", expert=SQL)
        sql["results"] = [{"kind": "gateway", "loss": 5.0, "tokens": 300, "examples": 9}]
        assert admin.post("/v1/metrics/evaluations", json=sql).status_code == 200

        history = admin.get("/v1/metrics/history").json()
        assert [(r["worker_id"], r["kind"], r["loss"]) for r in history] == [
            ("sql-w", "gateway", 5.0),
            (PY_WORKER, "gateway", 3.0),
            (PY_WORKER, "expert", 2.0),
        ]
        assert all(r["expert_version"] == 0 and r["gateway_version"] == 0 for r in history)
        by_kind = admin.get("/v1/metrics/history", params={"kind": "expert"}).json()
        assert [r["worker_id"] for r in by_kind] == [PY_WORKER]
        by_worker = admin.get("/v1/metrics/history", params={"worker_id": "sql-w"}).json()
        assert [r["expert"] for r in by_worker] == [SQL]
        assert len(admin.get("/v1/metrics/history", params={"limit": 1}).json()) == 1
        later = history[0]["created_at"] + 1
        assert admin.get("/v1/metrics/history", params={"since": later}).json() == []
        assert len(admin.get("/v1/metrics/history", params={"until": later}).json()) == 3


@pytest.mark.parametrize(
    ("change", "status", "code", "phrase"),
    [
        (
            {"results": [{"kind": "expert", "loss": -1, "tokens": 5, "examples": 1}]},
            422,
            "invalid_request",
            "loss",
        ),
        (
            {"results": [{"kind": "expert", "loss": 1, "tokens": 0, "examples": 1}]},
            422,
            "invalid_request",
            "tokens",
        ),
        (
            {"results": [{"kind": "oracle", "loss": 1, "tokens": 5, "examples": 1}]},
            422,
            "invalid_request",
            "kind",
        ),
        ({"results": []}, 422, "invalid_request", "results"),
        ({"expert_version": 7}, 422, "invalid_update", "expert_version 7"),
        ({"gateway_version": -1}, 422, "invalid_request", "gateway_version"),
        ({"expert": "nope"}, 404, "unknown_expert", "nope"),
        ({"expert": SQL}, 403, "forbidden", "registered for"),
        ({"worker_id": "stranger"}, 409, "unknown_worker", "stranger"),
    ],
)
def test_bad_reports_are_refused_and_change_nothing(live, change, status, code, phrase) -> None:
    with live.client(TOKEN) as admin:
        register(admin, PY_WORKER, PY)
        response = admin.post("/v1/metrics/evaluations", json=eval_report(**change))
        assert_error(response, status, code, phrase)
        assert admin.get("/v1/metrics/history").json() == []


def test_non_finite_loss_and_foreign_worker_are_refused(live) -> None:
    with live.client(TOKEN) as admin, live.client(W_TOKEN) as worker:
        register(admin, PY_WORKER, PY)
        register(admin, "other", PY)
        body = json.dumps(eval_report()).replace("2.0", "NaN")
        response = admin.post(
            "/v1/metrics/evaluations", content=body, headers={"Content-Type": "application/json"}
        )
        assert_error(response, 422, "invalid_request", "finite")
        assert_error(
            worker.post("/v1/metrics/evaluations", json=eval_report(worker_id="other")),
            403,
            "forbidden",
            "other",
        )
        assert_error(
            live.client("").post("/v1/metrics/evaluations", json=eval_report()), 401, "unauthorized"
        )
        assert admin.get("/v1/metrics/history").json() == []


def test_reports_survive_a_restart(live_coordinator_factory, tmp_path) -> None:
    first = live_coordinator_factory(state_dir=tmp_path / "state")
    with first.client() as client:
        register(client, PY_WORKER, PY)
        assert client.post("/v1/metrics/evaluations", json=eval_report()).status_code == 200
    first.stop()
    second = live_coordinator_factory(state_dir=tmp_path / "state")
    with second.client() as client:
        rows = client.get("/v1/metrics/history").json()
    assert sorted((r["kind"], r["loss"]) for r in rows) == [("expert", 2.0), ("gateway", 3.0)]


def test_default_cadence_is_about_a_minute() -> None:
    assert default_eval_every(10.0) == 6
    assert default_eval_every(1.0) == 60
    assert default_eval_every(120.0) == 1
    with pytest.raises(ValueError, match="eval_every"):
        WorkerOptions(
            coordinator_url="http://x",
            worker_id="w",
            specialty="e",
            dataset="d.jsonl",
            eval_every=-1,
        )


def test_swapped_lora_evaluates_another_rank_and_restores_training_weights() -> None:
    base = load_base_model("tiny", device="cpu")
    model = attach_lora(base.model, LoraSettings())
    before = adapter_state(model)
    parameters = dict(model.named_parameters())
    wide = {
        key: torch.randn(t.shape[0] * 3, t.shape[1])
        if ".lora_A." in key
        else torch.randn(t.shape[0], t.shape[1] * 3)
        for key, t in before.items()
    }
    with swapped_lora(model, wide):
        assert any(p.shape[0] == 24 for name, p in model.named_parameters() if "lora_A" in name)
    after = adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is parameters[n] for n, p in model.named_parameters())


def test_worker_reports_expert_and_gateway_losses_that_match_an_independent_evaluation(
    live_coordinator_factory, tmp_path
) -> None:
    live = live_coordinator_factory()
    data = write_demo_datasets(tmp_path / "data", train_count=40, validation_count=12)
    train, validation = data[PY]
    options = WorkerOptions(
        coordinator_url=live.url,
        worker_id=PY_WORKER,
        specialty=PY,
        dataset=train,
        eval_dataset=validation,
        # inline syncs at every step boundary, whatever the machine's load: a background
        # sync still in flight when 6 fast steps end would leave only the final evaluation
        sync_mode="inline",
        sync_interval=0.001,
        max_steps=6,
        eval_every=1,
        eval_max_examples=5,
    )
    job = WorkerJob(options)
    job.run()
    with CoordinatorClient(live.url) as client:
        history = client.evaluation_history(worker_id=PY_WORKER)
        status = client.status()
        fetch_adapter_dir(client, tmp_path / "gateway")
        fetch_adapter_dir(client, tmp_path / "expert", expert=PY)
    assert len(history) >= 4 and {r["kind"] for r in history} == {"expert", "gateway"}
    final = [r for r in history if r["final"]]
    assert {r["kind"] for r in final} == {"expert", "gateway"}
    expert_row = next(r for r in final if r["kind"] == "expert")
    gateway_row = next(r for r in final if r["kind"] == "gateway")
    assert expert_row["expert_version"] == status.experts[PY].version > 0
    assert gateway_row["gateway_version"] == status.gateway.version
    assert expert_row["examples"] == 5

    # The same numbers, measured independently with PEFT on the same five examples.
    base = load_base_model("tiny", device="cpu")
    examples = tokenize_examples(load_examples(validation), base.tokenizer, max_length=256)[:5]
    pad = base.tokenizer.pad_token_id
    for row, directory in ((expert_row, "expert"), (gateway_row, "gateway")):
        model = PeftModel.from_pretrained(
            load_base_model("tiny", device="cpu").model, str(tmp_path / directory)
        )
        expected = validation_loss(model, examples, pad_token_id=pad)
        assert math.isclose(row["loss"], expected, rel_tol=1e-4), (directory, row, expected)
    assert expert_row["loss"] != gateway_row["loss"]
