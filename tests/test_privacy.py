"""Example-level DP-SGD in the worker (Opacus): the accounting equals Opacus' own
accountant, a real DP worker reports its ε over HTTP and stops at its budget, and
bad combinations of options or a bad ε header are refused."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from pydantic import ValidationError

from benchmarks.attackers import run_worker, sql_shards
from fedmoe.batching import tokenize_examples
from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.data import parse_record
from fedmoe.demo_data import generate_domain
from fedmoe.modeling import attach_lora, load_base_model
from fedmoe.worker.options import WorkerOptions
from fedmoe.worker.privacy import PrivateTrainer, plan_privacy, sample_rate_for
from tests.api_helpers import register, update_headers, upload
from tests.conftest import start_live_coordinator

pytestmark = pytest.mark.heavy(13)  # run early (tests/conftest.py)

SQL = "sql_expert"


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_spent_epsilon_equals_opacus_accountant(kind: str) -> None:
    base = load_base_model("tiny", device="cpu")
    model = attach_lora(base.model, LoraSettings(rank=2))
    records = [parse_record(r) for r in generate_domain(SQL, 10, seed=3)]
    examples = tokenize_examples(records, base.tokenizer, max_length=160)
    settings = TrainSettings(batch_size=2, dp_noise_multiplier=1.3, dp_accountant=kind)
    plan = plan_privacy(settings, dataset_size=len(examples), planned_steps=None)
    trainer = PrivateTrainer(
        model,
        examples,
        settings,
        pad_token_id=base.tokenizer.pad_token_id,
        device=base.model.device,
        learning_rate=0.01,
        privacy=plan,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        trainer.step()
    reference = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for _ in range(3):
        reference.step(noise_multiplier=1.3, sample_rate=sample_rate_for(2, len(examples)))
    delta = 1.0 / len(examples)
    assert trainer.spent_epsilon() == pytest.approx(reference.get_epsilon(delta=delta), rel=1e-9)
    assert plan.epsilon_after(3) == pytest.approx(reference.get_epsilon(delta=delta), rel=1e-9)
    changed = {n for n, p in model.named_parameters() if not p.equal(before[n])}
    assert changed and all("lora_" in name for name in changed)  # the base stays frozen


def test_noise_from_budget_and_steps_within_it() -> None:
    settings = TrainSettings(batch_size=4, dp_epsilon=4.0, dp_delta=1e-3)
    plan = plan_privacy(settings, dataset_size=100, planned_steps=50)
    expected = get_noise_multiplier(
        target_epsilon=4.0, target_delta=1e-3, sample_rate=0.04, steps=50, accountant="rdp"
    )
    assert plan.noise_multiplier == expected and plan.sample_rate == 0.04
    assert plan.epsilon_after(50) <= 4.0 < plan.epsilon_after(60)
    allowed = plan.steps_within_budget()
    assert allowed is not None and allowed >= 50
    assert plan.epsilon_after(allowed) <= 4.0 < plan.epsilon_after(allowed + 1)


def test_dp_options_are_validated() -> None:
    with pytest.raises(ValidationError, match="no effect without dp_epsilon"):
        TrainSettings(dp_delta=1e-5)
    with pytest.raises(ValidationError, match="grad_accum must be 1"):
        TrainSettings(dp_noise_multiplier=1.0, grad_accum=2)
    with pytest.raises(ValidationError, match="dp_max_grad_norm instead"):
        TrainSettings(dp_noise_multiplier=1.0, max_grad_norm=0.5)
    with pytest.raises(ValidationError, match="needs max_steps"):
        WorkerOptions(
            worker_id="w", specialty=SQL, dataset=Path("x.jsonl"), train={"dp_epsilon": 1.0}
        )
    with pytest.raises(ValidationError, match="greater than 0"):
        TrainSettings(dp_epsilon=0.0)
    for switch in ({"packing": "on"}, {"cross_entropy": "chunked"}, {"torch_compile": "on"}):
        with pytest.raises(ValidationError, match="no effect with DP-SGD"):
            TrainSettings(dp_noise_multiplier=1.0, **switch)
    TrainSettings(dp_noise_multiplier=1.0, cross_entropy="full", packing="off")


def test_dp_worker_reports_epsilon_over_http_and_stops_at_its_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (dataset,) = sql_shards(tmp_path, 1, 12, seed=4)
    settings = TrainSettings(batch_size=3, dp_noise_multiplier=1.0, dp_epsilon=1.0)
    plan = plan_privacy(settings, dataset_size=12, planned_steps=None)
    budget_steps = plan.steps_within_budget()
    assert budget_steps is not None and 2 <= budget_steps <= 12, budget_steps
    live = start_live_coordinator(tmp_path / "state", experts=[SQL])
    try:
        with caplog.at_level(logging.WARNING, logger="fedmoe.worker.job"):
            summary = run_worker(
                live.url,
                "dp-worker",
                SQL,
                dataset,
                max_steps=None,  # only the budget stops it
                sync_interval=0.01,
                batch_size=3,
                dp_noise_multiplier=1.0,
                dp_epsilon=1.0,
            )
        assert summary["steps"] == budget_steps
        assert "privacy budget spent" in caplog.text
        with live.client() as client:
            rows = client.get("/v1/ledger").json()
            reported = [row["dp_epsilon"] for row in reversed(rows)]
            assert len(reported) >= 2 and reported == sorted(reported)
            assert reported[-1] == pytest.approx(plan.epsilon_after(budget_steps), rel=1e-9)
            assert reported[-1] <= 1.0
            status = client.get("/v1/status").json()
            assert status["workers"]["dp-worker"]["dp_epsilon"] == reported[-1]
            charts = client.get("/v1/metrics/updates").json()
            assert charts[0]["dp_epsilon"] == reported[-1]
            register(client, "honest", SQL)
            for bad in ("-1", "nan", "inf", "1e7", "x"):
                headers = update_headers("honest", 0, f"bad-{bad}") | {"X-FedMoE-DP-Epsilon": bad}
                answer = upload(client, SQL, b"unused", headers)
                assert answer.status_code == 422, (bad, answer.text)
                assert "dp-epsilon" in answer.text.lower(), answer.text
    finally:
        live.stop()
    assert math.isfinite(summary["dp_epsilon"])
