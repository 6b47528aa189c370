"""Domain signatures over real HTTP: validation, per-worker combination, kill -9 durability,
a real worker sending its signature, and the gateway CLI routing a prompt."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
import torch
from typer.testing import CliRunner

from fedmoe.cli import app
from fedmoe.data import load_examples, parse_record
from fedmoe.demo_data import DOMAINS, generate_domain, write_demo_datasets
from fedmoe.featurizer import FeaturizerSettings
from fedmoe.modeling import load_base_model
from fedmoe.procs import start_coordinator, start_worker, stop
from fedmoe.signature import DomainSignature, compute_signature
from tests.api_helpers import PY, PY_WORKER, SQL, SQL_WORKER, assert_error, register

pytestmark = pytest.mark.heavy(11)  # run early (tests/conftest.py)


def synthetic(fingerprint: str, count: int = 120, dim: int = 64, seed: int = 0) -> dict[str, Any]:
    """A well-formed signature (the featurizer's shape) for validation tests."""
    features = torch.nn.functional.normalize(
        torch.randn((count, dim), generator=torch.Generator().manual_seed(seed)), dim=-1
    )
    return DomainSignature.from_features(
        features, FeaturizerSettings(), fingerprint, min_count=1
    ).to_dict()


def post(client: httpx.Client, expert: str, worker: str, signature: dict) -> httpx.Response:
    body = json.dumps({"worker_id": worker, "signature": signature})  # NaN as JSON allows it
    headers = {"Content-Type": "application/json"}
    return client.post(f"/v1/experts/{expert}/signature", content=body, headers=headers)


def test_signatures_are_validated_combined_and_served(live_coordinator) -> None:
    with live_coordinator.client() as client:
        fingerprint = client.get("/v1/schema").json()["base_model_fingerprint"]
        register(client, PY_WORKER, PY)
        register(client, "py-worker-2", PY)
        register(client, SQL_WORKER, SQL)
        assert_error(client.get(f"/v1/experts/{PY}/signature"), 404, "no_signature", PY)
        good = synthetic(fingerprint)
        refused = [
            ({**good, "count": 99}, "count 99 is below the minimum of 100"),
            ({**good, "base_fingerprint": "config:0/weights:0"}, "fingerprint"),
            ({**good, "featurizer": {**good["featurizer"], "version": "old/0"}}, "featurizer"),
            ({**good, "featurizer": {**good["featurizer"], "prefix_tokens": 8}}, "featurizer"),
            (synthetic(fingerprint, dim=32), "dimension 32 differs from the base model's 64"),
            ({**good, "var": good["var"][:10]}, "var has shape"),
            ({**good, "mean": [math.nan] * 64}, "NaN"),
        ]
        for signature, phrase in refused:
            response = post(client, PY, PY_WORKER, signature)
            assert_error(response, 422, "invalid_signature", phrase)
        assert not (live_coordinator.state_dir / "signatures" / f"{PY}.safetensors").exists()
        assert_error(post(client, "nope", PY_WORKER, good), 404, "unknown_expert")
        assert_error(post(client, PY, "stranger", good), 409, "unknown_worker")
        assert_error(post(client, SQL, PY_WORKER, good), 403, "forbidden", "registered for")

        first = post(client, PY, PY_WORKER, good).json()
        assert (first["count"], first["expert_count"], first["workers"]) == (120, 120, [PY_WORKER])
        second_sig = synthetic(fingerprint, count=200, seed=1)
        second = post(client, PY, "py-worker-2", second_sig).json()
        assert second["expert_count"] == 320
        again = post(client, PY, PY_WORKER, good).json()  # a restarted worker replaces its own
        assert again["expert_count"] == 320

        served = client.get(f"/v1/experts/{PY}/signature").json()
        expected = DomainSignature.combine(
            [DomainSignature.from_dict(good), DomainSignature.from_dict(second_sig)]
        )
        assert served["count"] == 320 and served["workers"] == [PY_WORKER, "py-worker-2"]
        assert torch.allclose(torch.tensor(served["mean"]), expected.mean, atol=1e-6)
        everything = client.get("/v1/signatures").json()
        assert set(everything["signatures"]) == {PY}
        assert everything["missing"] == [SQL, "docs_expert"]
        assert everything["min_count"] == 100
        router = client.get("/v1/gateway").json()["router"]
        assert router["default"] == "routed" and router["experts"][PY]["count"] == 320


def test_the_merged_gateway_is_built_only_when_downloaded(live_coordinator) -> None:
    with live_coordinator.client() as client:
        info = client.get("/v1/gateway").json()
        assert info["router"]["default"] == "merged"  # no signatures yet
        assert live_coordinator.coordinator.gateway._payload is None
        assert not (live_coordinator.adapters_dir / "gateway.safetensors").exists()
        assert client.get("/v1/gateway/adapter").status_code == 200
        assert live_coordinator.coordinator.gateway._payload is not None


def sql_prompt() -> str:
    record = generate_domain("sql_expert", 1, seed=99)[0]
    if "prompt" not in record:
        record = generate_domain("sql_expert", 5, seed=99)[1]
    return str(record["prompt"])


def test_worker_signature_survives_kill_minus_nine_and_routes_the_gateway_cli(tmp_path) -> None:
    """A real worker sends its signature; after kill -9 and restart it is still served,
    and ``fedmoe gateway --prompt`` routes a SQL prompt to the SQL expert."""
    data = write_demo_datasets(tmp_path / "data", train_count=110, validation_count=5)
    state, log = tmp_path / "state", tmp_path / "coordinator.log"
    coordinator, url = start_coordinator(state, log)
    worker = None
    try:
        train, validation = data[SQL]
        worker = start_worker(
            url, SQL_WORKER, SQL, train, tmp_path / "worker.log",
            "--eval-dataset", str(validation), "--max-steps", "1", "--signature-noise", "0",
        )  # fmt: skip
        base = load_base_model("tiny", device="cpu")
        with httpx.Client(base_url=url, timeout=30) as client:
            for domain in (PY, "docs_expert"):  # the two other domains, from this process
                register(client, f"w-{domain}", domain)
                records = generate_domain(domain, 110, seed=5)
                signature = compute_signature(
                    base.model,
                    base.tokenizer,
                    [parse_record(r) for r in records],
                    FeaturizerSettings(),
                    base.fingerprint,
                )
                assert post(client, domain, f"w-{domain}", signature.to_dict()).status_code == 200
            assert worker.wait(timeout=180) == 0, (tmp_path / "worker.log").read_text()[-3000:]
            sent = client.get(f"/v1/experts/{SQL}/signature").json()
        mine = compute_signature(
            base.model, base.tokenizer, load_examples(train), FeaturizerSettings(), base.fingerprint
        )
        assert sent["count"] == 110 and sent["workers"] == [SQL_WORKER]
        assert torch.allclose(torch.tensor(sent["mean"]), mine.mean, atol=1e-5)
        coordinator.kill()  # SIGKILL: no shutdown handler runs
        coordinator.wait()
        coordinator, url = start_coordinator(state, log)
        with httpx.Client(base_url=url, timeout=30) as client:
            restored = client.get("/v1/signatures").json()["signatures"]
        assert set(restored) == set(DOMAINS)
        assert restored[SQL]["mean"] == sent["mean"] and restored[SQL]["count"] == 110
        args = ["gateway", "--coordinator-url", url, "--prompt", sql_prompt()]
        routed = CliRunner().invoke(app, [*args, "--max-new-tokens", "4"])
        assert routed.exit_code == 0, routed.output
        assert f"served by: {SQL} (routed" in routed.output
        assert "router: gaussian" in routed.output
        merged = CliRunner().invoke(app, [*args, "--max-new-tokens", "4", "--merged"])
        assert "served by: gateway (merged, not routed)" in merged.output
    finally:
        if worker is not None:  # a failed test must not leave it retrying forever
            stop(worker, grace=5)
        stop(coordinator)


def test_a_worker_with_too_few_examples_says_so_and_sends_nothing(caplog) -> None:
    """Fewer examples than the minimum: no signature leaves, and the log says why."""
    from fedmoe.worker.signing import share_signature

    base = load_base_model("tiny", device="cpu")
    examples = [parse_record(r) for r in generate_domain(PY, 40, seed=1)]

    class Offer:  # a fake client: the coordinator's answer to GET /v1/signatures
        def signatures(self) -> dict[str, Any]:
            return {"featurizer": FeaturizerSettings().to_dict(), "min_count": 100}

        def submit_signature(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            raise AssertionError("nothing may be sent below the minimum")

    ack = share_signature(
        Offer(),  # type: ignore[arg-type]
        worker_id="w",
        specialty=PY,
        model=base.model,
        tokenizer=base.tokenizer,
        fingerprint=base.fingerprint,
        examples=examples,
    )
    assert ack is None
    assert "at least 100 examples, got 40" in caplog.text
