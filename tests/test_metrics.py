"""Prometheus ``/metrics``: parsed with prometheus_client's own parser; every metric moves."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api_helpers import (
    PY,
    PY_WORKER,
    assert_error,
    delta_body,
    register,
    update_headers,
    upload,
)

TOKEN = "metrics-admin-token-0123456789"
FAMILIES = {
    "fedmoe_updates_accepted",
    "fedmoe_updates_rejected",
    "fedmoe_update_staleness",
    "fedmoe_update_weight",
    "fedmoe_ack_latency_seconds",
    "fedmoe_received_bytes",
    "fedmoe_served_bytes",
    "fedmoe_expert_version",
    "fedmoe_gateway_version",
    "fedmoe_gateway_build_seconds",
    "fedmoe_workers_active",
    "fedmoe_eval_loss",
    "fedmoe_http_requests",
}


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics`` as {(name, sorted labels): value}, and the family names."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        samples[("family", ((family.name, family.type),))] = 1.0
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def families(samples) -> set[str]:
    return {labels[0][0] for (name, labels) in samples if name == "family"}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def live(live_coordinator_factory):
    return live_coordinator_factory(auth_token=TOKEN)


def test_every_metric_is_present_and_moves_when_an_update_arrives(live) -> None:
    with live.client() as client:
        register(client, PY_WORKER, PY)
        before = scrape(client)
        assert families(before) >= FAMILIES, FAMILIES - families(before)

        body = delta_body(client, 1)
        assert upload(client, PY, body, update_headers()).status_code == 200
        client.get("/v1/gateway/adapter")  # builds the gateway
        assert_error(upload(client, PY, b"junk", update_headers()), 422, "invalid_update")
        report = {
            "worker_id": PY_WORKER,
            "expert": PY,
            "expert_version": 1,
            "gateway_version": 1,
            "results": [{"kind": "gateway", "loss": 2.5, "tokens": 40, "examples": 2}],
        }
        assert client.post("/v1/metrics/evaluations", json=report).status_code == 200
        after = scrape(client)

    moved = {
        "accepted": ("fedmoe_updates_accepted_total", {"expert": PY}),
        "rejected": ("fedmoe_updates_rejected_total", {"expert": PY, "reason": "invalid_update"}),
        "staleness": ("fedmoe_update_staleness_count", {"expert": PY}),
        "weight": ("fedmoe_update_weight_sum", {"expert": PY}),
        "latency": ("fedmoe_ack_latency_seconds_count", {}),
        "received": ("fedmoe_received_bytes_total", {"route": "/v1/experts/{name}/updates"}),
        "served": ("fedmoe_served_bytes_total", {"route": "/v1/gateway/adapter"}),
        "expert version": ("fedmoe_expert_version", {"expert": PY}),
        "gateway version": ("fedmoe_gateway_version", {}),
        "gateway build": ("fedmoe_gateway_build_seconds_count", {}),
        "eval loss": ("fedmoe_eval_loss", {"domain": PY, "model": "gateway"}),
        "requests": (
            "fedmoe_http_requests_total",
            {"route": "/v1/experts/{name}/updates", "method": "POST", "status": "200"},
        ),
    }
    for what, (name, labels) in moved.items():
        assert value(after, name, **labels) > value(before, name, **labels), what
    assert value(after, "fedmoe_expert_version", expert=PY) == 1
    assert value(after, "fedmoe_eval_loss", domain=PY, model="gateway") == 2.5
    assert value(after, "fedmoe_workers_active", expert=PY) == 1
    assert value(after, "fedmoe_workers_active", expert="sql_expert") == 0
    assert value(after, "fedmoe_received_bytes_total", route="/v1/experts/{name}/updates") >= len(
        body
    )


def test_eval_loss_is_token_weighted_over_each_workers_latest_report(live) -> None:
    with live.client() as client:
        for worker, loss, tokens in (("a", 9.0, 10), ("a", 1.0, 100), ("b", 4.0, 300)):
            if worker not in client.get("/v1/status").json()["workers"]:
                register(client, worker, PY)
            report = {
                "worker_id": worker,
                "expert": PY,
                "expert_version": 0,
                "gateway_version": 0,
                "results": [{"kind": "expert", "loss": loss, "tokens": tokens, "examples": 1}],
            }
            assert client.post("/v1/metrics/evaluations", json=report).status_code == 200
        samples = scrape(client)
    # a's latest (1.0 over 100 tokens) and b's (4.0 over 300): (100 + 1200) / 400
    assert value(samples, "fedmoe_eval_loss", domain=PY, model="expert") == pytest.approx(3.25)


def test_unknown_paths_and_experts_do_not_mint_label_values(live) -> None:
    with live.client() as client:
        client.get("/no/such/path/12345")
        upload(client, "made-up-expert-xyz", b"x", update_headers())
        text = client.get("/metrics").text
    assert "12345" not in text and "made-up-expert-xyz" not in text
    assert 'route="other"' in text and 'expert="unknown"' in text


def test_metrics_need_a_token_like_the_rest_of_the_api(live) -> None:
    with live.client("") as anonymous:
        assert_error(anonymous.get("/metrics"), 401, "unauthorized")
        assert anonymous.get("/healthz").status_code == 200
    with live.client() as client:
        text = client.get("/metrics").text
    assert 'status="401"' in text  # refused requests are counted too


def test_loopback_scrape_without_token_when_allowed(live_coordinator_factory) -> None:
    live = live_coordinator_factory(auth_token=TOKEN, metrics_loopback_open=True)
    with live.client("") as anonymous:
        response = anonymous.get("/metrics")
        assert response.status_code == 200
        assert "fedmoe_expert_version" in response.text
        assert_error(anonymous.get("/v1/status"), 401, "unauthorized")  # nothing else opens


def test_two_coordinators_in_one_process_have_their_own_registries(
    live_coordinator_factory,
) -> None:
    first, second = live_coordinator_factory(), live_coordinator_factory()
    with first.client() as a, second.client() as b:
        register(a, PY_WORKER, PY)
        body = delta_body(a, 2)
        assert upload(a, PY, body, update_headers()).status_code == 200
        assert value(scrape(a), "fedmoe_updates_accepted_total", expert=PY) == 1
        assert value(scrape(b), "fedmoe_updates_accepted_total", expert=PY) == 0
        assert json.loads(b.get("/v1/metrics/rejections").content) == []
