"""The update rule over HTTP: staleness weights, norm and staleness policies, overflow,
idempotent retries and ETags that change with versions, checked against the state."""

from __future__ import annotations

import math

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors

from fedmoe.adapters import encode_adapter
from tests import api_helpers as api
from tests.api_helpers import PY, PY_WORKER, SQL, SQL_WORKER

# --- conditional downloads -------------------------------------------------------------------


def test_etag_changes_with_the_version(live_coordinator) -> None:
    with live_coordinator.client() as client:
        api.register(client, PY_WORKER, PY)
        tags = {
            p: client.get(p).headers["ETag"]
            for p in (f"/v1/experts/{PY}/adapter", "/v1/gateway/adapter")
        }
        body = api.delta_body(client, 1)
        assert api.upload(client, PY, body, api.update_headers()).status_code == 200
        for path, old in tags.items():
            response = client.get(path, headers={"If-None-Match": old})
            assert response.status_code == 200 and response.headers["ETag"] != old


# --- idempotent retries ----------------------------------------------------------------------


def test_retried_update_id_is_applied_once(live_coordinator) -> None:
    with live_coordinator.client() as client:
        api.register(client, PY_WORKER, PY)
        shapes = api.shapes_of(client)
        headers = api.update_headers(update_id="retry-me-1")
        first = api.upload(client, PY, encode_adapter(api.random_delta(shapes, 1)), headers)
        assert first.status_code == 200, first.text
        assert first.json()["replayed"] is False and first.json()["version"] == 1
        state_after_first = api.expert_state(client, PY)
        second = api.upload(client, PY, encode_adapter(api.random_delta(shapes, 1)), headers)
        assert second.status_code == 200, second.text
        assert second.json() == {**first.json(), "replayed": True}
        # another body under the same id is not a retry (tests/test_hardening.py, item 7)
        other = api.upload(client, PY, encode_adapter(api.random_delta(shapes, 2)), headers)
        api.assert_error(other, 409, "duplicate_update_id", "different body")
        status = client.get("/v1/status").json()
        assert status["experts"][PY]["version"] == 1
        assert status["experts"][PY]["updates_applied"] == 1
        assert status["gateway"]["version"] == 1
        rows = [r for r in client.get("/v1/ledger").json() if r["update_id"] == "retry-me-1"]
        assert [(r["accepted"], r["expert_version"]) for r in rows] == [(1, 1)]
        after = api.expert_state(client, PY)
        assert all(torch.equal(after[k], state_after_first[k]) for k in after)


def test_an_update_id_used_by_another_worker_is_409_and_reveals_nothing(live_coordinator) -> None:
    with live_coordinator.client() as client:
        api.register(client, PY_WORKER, PY)
        api.register(client, SQL_WORKER, SQL)
        api.register(client, "py-worker-2", PY)
        shapes = api.shapes_of(client)
        body = encode_adapter(api.random_delta(shapes, 1))
        first = api.upload(client, PY, body, api.update_headers(update_id="taken-id-1"))
        assert first.status_code == 200, first.text
        before = client.get("/v1/status").json()["experts"]
        for worker, expert in (("py-worker-2", PY), (SQL_WORKER, SQL)):
            headers = api.update_headers(worker_id=worker, update_id="taken-id-1")
            response = api.upload(client, expert, body, headers)
            api.assert_error(response, 409, "duplicate_update_id", "already used")
            assert "version" not in response.json()
        assert client.get("/v1/status").json()["experts"] == before


# --- the update rule and its policies --------------------------------------------------------


def _advance(client: httpx.Client, shapes: dict, versions: int) -> None:
    """Apply ``versions`` fresh (staleness 0) updates to python_expert."""
    for base in range(versions):
        body = encode_adapter(api.random_delta(shapes, seed=100 + base))
        response = api.upload(client, PY, body, api.update_headers(base_version=base))
        assert response.status_code == 200 and response.json()["staleness"] == 0


def _assert_applied(
    before: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
    delta: dict[str, torch.Tensor],
    weight: float,
) -> None:
    """after == before + weight·delta within 1e-6 (computed here in float64)."""
    assert set(after) == set(before) == set(delta)
    for key in before:
        expected = before[key].double() + weight * delta[key].double()
        error = (after[key].double() - expected).abs().max().item()
        assert error < 1e-6, (key, error)


def test_stale_update_is_weighted_by_inverse_decay(live_coordinator) -> None:
    with live_coordinator.client() as client:
        api.register(client, PY_WORKER, PY)
        shapes = api.shapes_of(client)
        _advance(client, shapes, 2)
        theta = api.expert_state(client, PY)
        delta = api.random_delta(shapes, seed=5, scale=0.05)
        response = api.upload(client, PY, encode_adapter(delta), api.update_headers(base_version=0))
        assert response.status_code == 200, response.text
        ack = response.json()
        assert ack["staleness"] == 2 and ack["version"] == 3 and not ack["clipped"]
        weight = 1.0 / (1.0 + 0.1 * 2)  # s(τ) = 1/(1 + 0.1τ) at τ = 2, η = 1
        assert ack["weight"] == pytest.approx(1 / 1.2, abs=1e-12)
        _assert_applied(theta, api.expert_state(client, PY), delta, weight)
    live_coordinator.stop()  # a clean stop writes every expert's snapshot
    on_disk = load_safetensors(
        (live_coordinator.adapters_dir / f"{PY}.v{3:010d}.safetensors").read_bytes()
    )
    _assert_applied(theta, dict(on_disk), delta, weight)


def test_clip_policy_scales_the_update_to_the_bound(live_coordinator_factory) -> None:
    bound, lr = 0.5, 0.8
    live = live_coordinator_factory(max_update_norm=bound, norm_policy="clip", server_lr=lr)
    with live.client() as client:
        api.register(client, PY_WORKER, PY)
        shapes = api.shapes_of(client)
        body = encode_adapter(api.random_delta(shapes, seed=9, scale=1e-4))
        under_the_bound = api.upload(client, PY, body, api.update_headers())
        assert under_the_bound.status_code == 200
        theta = api.expert_state(client, PY)
        delta = api.random_delta(shapes, seed=11, scale=0.1)
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))
        assert norm > bound
        response = api.upload(client, PY, encode_adapter(delta), api.update_headers(base_version=0))
        assert response.status_code == 200, response.text
        ack = response.json()
        assert ack["clipped"] is True and ack["staleness"] == 1
        assert ack["update_norm"] == pytest.approx(norm, rel=1e-6)
        weight = lr * (1 / 1.1) * (bound / norm)  # η · s(1) · (bound / ‖Δ‖)
        assert ack["weight"] == pytest.approx(weight, rel=1e-9)
        _assert_applied(theta, api.expert_state(client, PY), delta, weight)


def _assert_rejected_row(client: httpx.Client, update_id: str, *phrases: str) -> None:
    rows = [r for r in client.get("/v1/ledger").json() if r["update_id"] == update_id]
    assert len(rows) == 1 and rows[0]["accepted"] == 0, rows
    assert rows[0]["expert_version"] is None and rows[0]["gateway_version"] is None
    for phrase in phrases:
        assert phrase in rows[0]["reason"]


def _assert_only_rejection_recorded(before: dict, after: dict) -> None:
    """Versions and files as before; the ledger gained exactly one rejected row for PY."""
    assert after["gateway"] == before["gateway"]
    assert after["files"] == before["files"]
    for name, old in before["experts"].items():
        bumped = {**old, "updates_rejected": old["updates_rejected"] + (name == PY)}
        assert after["experts"][name] == bumped
    assert len(after["ledger_api"]) == len(before["ledger_api"]) + 1
    assert after["ledger_api"][1:] == before["ledger_api"]  # newest first
    db_before, db_after = before["ledger_db"], after["ledger_db"]
    assert db_after["meta"] == db_before["meta"]
    assert db_after["gateway"] == db_before["gateway"]
    assert [row[:3] for row in db_after["experts"]] == [row[:3] for row in db_before["experts"]]
    assert db_after["updates"][:-1] == db_before["updates"]


def test_reject_policy_refuses_large_updates(live_coordinator_factory) -> None:
    live = live_coordinator_factory(max_update_norm=0.5, norm_policy="reject")
    with live.client() as client:
        api.register(client, PY_WORKER, PY)
        _advance(client, api.shapes_of(client), 1)
        before = api.snapshot(live, client)
        delta = api.random_delta(api.shapes_of(client), seed=11, scale=0.1)
        headers = api.update_headers(base_version=1, update_id="too-big")
        response = api.upload(client, PY, encode_adapter(delta), headers)
        api.assert_error(response, 422, "rejected_update", "exceeds max_update_norm 0.5")
        after = api.snapshot(live, client)
        _assert_only_rejection_recorded(before, after)
        _assert_rejected_row(client, "too-big", "exceeds max_update_norm")


def test_update_staler_than_max_staleness_is_409(live_coordinator_factory) -> None:
    live = live_coordinator_factory(max_staleness=1)
    with live.client() as client:
        api.register(client, PY_WORKER, PY)
        shapes = api.shapes_of(client)
        _advance(client, shapes, 2)
        before = api.snapshot(live, client)
        headers = api.update_headers(base_version=0, update_id="too-old")
        response = api.upload(client, PY, encode_adapter(api.random_delta(shapes, 3)), headers)
        api.assert_error(response, 409, "stale_update", "staleness 2 exceeds max_staleness 1")
        after = api.snapshot(live, client)
        _assert_only_rejection_recorded(before, after)
        _assert_rejected_row(client, "too-old", "staleness 2")
        # staleness 1 is still accepted, at weight s(1)
        body = encode_adapter(api.random_delta(shapes, 3))
        response = api.upload(client, PY, body, api.update_headers(base_version=1))
        assert response.status_code == 200 and response.json()["staleness"] == 1


def test_update_that_would_overflow_float32_is_422(live_coordinator_factory) -> None:
    """Each delta is finite, but θ + w·Δ would be Inf: refused, nothing stored."""
    live = live_coordinator_factory(server_lr=2.0)
    with live.client() as client:
        api.register(client, PY_WORKER, PY)
        shapes = api.shapes_of(client)
        huge = {k: torch.full(s, 3.0e38) for k, s in shapes.items()}  # < float32 max 3.4e38
        before = api.snapshot(live, client)
        response = api.upload(client, PY, encode_adapter(huge), api.update_headers())
        api.assert_error(response, 422, "invalid_update", "non-finite", "float32 overflow")
        api.assert_unchanged(before, api.snapshot(live, client))
        state = api.expert_state(client, PY)
        assert all(torch.isfinite(t).all() for t in state.values())


def test_overflow_accumulated_over_two_updates_is_422(live_coordinator) -> None:
    """Each update alone is fine; the second would push θ past float32's max: refused."""
    with live_coordinator.client() as client:
        api.register(client, PY_WORKER, PY)
        shapes = api.shapes_of(client)
        big = encode_adapter({k: torch.full(s, 2.0e38) for k, s in shapes.items()})
        first = api.upload(client, PY, big, api.update_headers(base_version=0))
        assert first.status_code == 200, first.text
        before = api.snapshot(live_coordinator, client)
        second = api.upload(client, PY, big, api.update_headers(base_version=1))
        api.assert_error(second, 422, "invalid_update", "float32 overflow")
        api.assert_unchanged(before, api.snapshot(live_coordinator, client))
