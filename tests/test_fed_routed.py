"""The routed gateway in federated evaluation: a real worker reports kind ``routed`` over
HTTP (loss and routing accuracy on its own prompts), the coordinator keeps it, and
``fedmoe status --watch`` shows it."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from peft import PeftModel
from rich.console import Console

from fedmoe.batching import tokenize_examples
from fedmoe.client import ApiError, CoordinatorClient
from fedmoe.config import LoraSettings
from fedmoe.data import load_examples, parse_record
from fedmoe.demo_data import generate_domain, write_demo_datasets
from fedmoe.evaluation import validation_loss
from fedmoe.export import fetch_adapter_dir
from fedmoe.featurizer import FeaturizerSettings
from fedmoe.modeling import load_base_model
from fedmoe.signature import compute_signature
from fedmoe.tiny import build_tiny_tokenizer
from fedmoe.watch import read_snapshot, render
from fedmoe.worker.fed_routed import RoutedEvaluation
from fedmoe.worker.job import WorkerJob
from fedmoe.worker.options import WorkerOptions
from tests.api_helpers import PY, PY_WORKER, SQL, SQL_WORKER, register

pytestmark = pytest.mark.heavy(6)  # run early (tests/conftest.py)


def test_worker_reports_the_routed_gateway_over_http(live_coordinator_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    live = live_coordinator_factory()  # signatures of at least 100 examples
    data = write_demo_datasets(tmp_path / "data", train_count=100, validation_count=6)
    base = load_base_model("tiny", device="cpu")
    sql = compute_signature(
        base.model,
        base.tokenizer,
        load_examples(data[SQL][0]),
        FeaturizerSettings(),
        base.fingerprint,
    ).to_dict()
    with httpx.Client(base_url=live.url) as http:
        register(http, SQL_WORKER, SQL)
        bad = {**sql, "subspace": {**sql["subspace"], "quantiles": [3.0, 2.0, 1.0]}}
        refused = http.post(
            f"/v1/experts/{SQL}/signature", json={"worker_id": SQL_WORKER, "signature": bad}
        )
        assert refused.status_code == 422 and "must not decrease" in refused.text
        sent = http.post(
            f"/v1/experts/{SQL}/signature", json={"worker_id": SQL_WORKER, "signature": sql}
        )
        assert sent.status_code == 200, sent.text
    train, validation = data[PY]
    job = WorkerJob(
        WorkerOptions(
            coordinator_url=live.url,
            worker_id=PY_WORKER,
            specialty=PY,
            dataset=train,
            eval_dataset=validation,
            sync_interval=0.3,
            max_steps=2,
            eval_every=0,  # only the final evaluation
            eval_max_examples=5,
        )
    )
    job.run()  # sends its own signature at start-up, then trains and evaluates

    with CoordinatorClient(live.url) as client:
        history = client.evaluation_history(worker_id=PY_WORKER)
        final = {row["kind"]: row for row in history if row["final"]}
        assert set(final) == {"expert", "gateway", "routed"}
        routed = final["routed"]
        # its own prompts all go to its own expert: the routed loss is the expert's own
        assert routed["routing_accuracy"] == 1.0
        assert math.isclose(routed["loss"], final["expert"]["loss"], rel_tol=1e-5)
        assert routed["tokens"] == final["expert"]["tokens"] and routed["examples"] == 5
        assert routed["loss"] != final["gateway"]["loss"]
        assert client.evaluation_history(kind="routed", worker_id=PY_WORKER)
        console = Console(width=200, record=True)
        console.print(render(read_snapshot(client)))
        text = console.export_text()
        assert "eval routed" in text and "routed here" in text
        row = next(line for line in text.splitlines() if PY in line and "%" in line)
        assert f"{routed['loss']:.3f}" in row and "100%" in row

        # another domain's prompts on this worker: routed to the SQL expert as the
        # coordinator has it, which an independent PEFT evaluation reproduces
        assert job.fed_eval is not None
        sql_examples = load_examples(data[SQL][1])[:4]
        other = RoutedEvaluation(
            client=client,
            tokenizer=job.tokenizer,
            examples=sql_examples,
            max_length=256,
            shapes=job.tensor_shapes,
            lora=job.lora,
            fingerprint=job.fingerprint,
        )
        result = other(job.fed_eval)
        assert result is not None and result["routing_accuracy"] == 0.0  # none went to PY
        fetch_adapter_dir(client, tmp_path / "sql", expert=SQL)
    model = PeftModel.from_pretrained(
        load_base_model("tiny", device="cpu").model, str(tmp_path / "sql")
    )
    items = tokenize_examples(sql_examples, base.tokenizer, max_length=256)
    expected = validation_loss(model, items, pad_token_id=base.tokenizer.pad_token_id)
    assert math.isclose(result["loss"], expected, rel_tol=1e-4)


class _Unavailable:
    """A coordinator that answers 503 to everything (a fake client in a unit test)."""

    def signatures(self) -> dict[str, Any]:
        raise ApiError(503, "unavailable", "state dir not writable")

    def download(self, path: str, etag: str | None = None) -> tuple[int, bytes | None, str]:
        raise AssertionError("nothing to download without signatures")


class _NoSignatures(_Unavailable):
    def signatures(self) -> dict[str, Any]:
        return {"signatures": {}, "router": {}}


def test_routed_evaluation_is_skipped_without_signatures_and_never_raises(caplog) -> None:  # type: ignore[no-untyped-def]
    examples = [parse_record(r) for r in generate_domain(PY, 3, seed=1)]
    evaluator = SimpleNamespace(worker_id=PY_WORKER, expert=PY)

    def make(client: Any) -> RoutedEvaluation:
        return RoutedEvaluation(
            client=client,
            tokenizer=build_tiny_tokenizer(),
            examples=examples,
            max_length=256,
            shapes={},
            lora=LoraSettings(),
            fingerprint="fp",
        )

    assert make(_NoSignatures())(evaluator) is None  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="fedmoe.worker.fed_routed"):
        assert make(_Unavailable())(evaluator) is None  # type: ignore[arg-type]
    assert "routed evaluation failed" in caplog.text and "503" in caplog.text
