"""Bad inputs to the HTTP API: the right 4xx, a JSON error naming the problem, no state change.

Every test talks to a real coordinator over loopback HTTP (``tests/conftest.py``)
and compares the coordinator's state before and after: versions (GET /v1/status),
the ledger (GET /v1/ledger and the SQLite file itself) and the sha256 of every
file under ``state_dir/adapters``, the gateway file included once its background
writer has settled on the current gateway version.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import random
import sqlite3
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors

from fedmoe.adapters import encode_adapter, read_header

PY, SQL = "python_expert", "sql_expert"
PY_WORKER, SQL_WORKER = "py-worker", "sql-worker"
LEDGER_TABLES = ("meta", "experts", "gateway", "workers", "updates")


# --- helpers ---------------------------------------------------------------------------------


def shapes_of(client: httpx.Client) -> dict[str, list[int]]:
    return client.get("/v1/schema").json()["tensors"]


def random_delta(shapes: dict[str, list[int]], seed: int, scale: float = 1e-3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) * scale for k, s in shapes.items()}


def register(client: httpx.Client, worker_id: str, specialty: str) -> dict[str, Any]:
    info = client.get("/v1/schema").json()
    response = client.post(
        "/v1/workers",
        json={
            "worker_id": worker_id,
            "specialty": specialty,
            "base_model_fingerprint": info["base_model_fingerprint"],
            "lora_config": info["lora_config"],
        },
    )
    assert response.status_code == 200, response.text
    return response.json()


def update_headers(
    worker_id: str = PY_WORKER, base_version: int = 0, update_id: str | None = None, **extra: str
) -> dict[str, str]:
    headers = {
        "Content-Type": "application/octet-stream",
        "X-FedMoE-Worker-Id": worker_id,
        "X-FedMoE-Update-Id": update_id or uuid.uuid4().hex,
        "X-FedMoE-Base-Version": str(base_version),
        "X-FedMoE-Num-Tokens": "10",
        "X-FedMoE-Train-Loss": "1.5",
    }
    headers.update(extra)
    return headers


def upload(
    client: httpx.Client, expert: str, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    return client.post(f"/v1/experts/{expert}/updates", content=body, headers=headers)


def expert_state(client: httpx.Client, expert: str) -> dict[str, torch.Tensor]:
    """The expert's current tensors, downloaded over HTTP (the server's own safetensors)."""
    response = client.get(f"/v1/experts/{expert}/adapter")
    assert response.status_code == 200
    return dict(load_safetensors(response.content))


def assert_error(response: httpx.Response, status: int, code: str, *phrases: str) -> None:
    """``status`` with a JSON ``{"error": code, "detail": …}`` whose detail has ``phrases``."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    for phrase in phrases:
        assert phrase.lower() in body["detail"].lower(), (phrase, body["detail"])


def wait_gateway_settled(live, client: httpx.Client, timeout: float = 20.0) -> None:
    """Wait until the background writer has saved the current gateway version."""
    path = live.adapters_dir / "gateway.safetensors"
    deadline = time.monotonic() + timeout
    while True:
        want = str(client.get("/v1/gateway").json()["version"])
        temps = list(live.adapters_dir.glob(".gateway.safetensors.*"))
        if path.exists() and not temps:
            saved = read_header(path.read_bytes()).get("__metadata__", {}).get("version")
            if saved == want:
                return
        assert time.monotonic() < deadline, f"gateway file never reached version {want}"
        time.sleep(0.02)


def hash_files(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def dump_ledger(path: Path) -> dict[str, list[tuple]]:
    """Every row of every ledger table, read through a separate read-only connection."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in LEDGER_TABLES}
    finally:
        db.close()


def snapshot(live, client: httpx.Client) -> dict[str, Any]:
    """Everything a refused request must leave byte-identical."""
    wait_gateway_settled(live, client)
    status = client.get("/v1/status").json()
    return {
        "experts": status["experts"],
        "gateway": status["gateway"],
        "workers": status["workers"],
        "ledger_api": client.get("/v1/ledger", params={"limit": 10000}).json(),
        "ledger_db": dump_ledger(live.state_dir / "ledger.sqlite3"),
        "files": hash_files(live.adapters_dir),
    }


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in before:
        assert after[key] == before[key], f"{key} changed"


# --- a coordinator with two registered workers, python_expert at version 2 ---------------------


@dataclass
class Prepared:
    live: Any
    shapes: dict[str, list[int]]
    fingerprint: str
    lora: dict[str, Any]
    version: int

    def good_body(self, seed: int = 7) -> bytes:
        return encode_adapter(random_delta(self.shapes, seed))


@pytest.fixture(scope="module")
def prepared(module_coordinator_factory) -> Prepared:
    live = module_coordinator_factory()
    with live.client() as client:
        info = client.get("/v1/schema").json()
        register(client, PY_WORKER, PY)
        register(client, SQL_WORKER, SQL)
        shapes = info["tensors"]
        for base in (0, 1):
            body = encode_adapter(random_delta(shapes, seed=base))
            response = upload(client, PY, body, update_headers(base_version=base))
            assert response.status_code == 200, response.text
    return Prepared(live, shapes, info["base_model_fingerprint"], info["lora_config"], 2)


@pytest.fixture
def checked(prepared: Prepared):
    """A client for ``prepared``; asserts after the test that the state is unchanged."""
    with prepared.live.client() as client:
        before = snapshot(prepared.live, client)
        yield client
        assert_unchanged(before, snapshot(prepared.live, client))


# --- bad uploads -----------------------------------------------------------------------------


def _with(p: Prepared, change: Callable[[dict], None], dtype=None) -> bytes:
    delta = random_delta(p.shapes, seed=3)
    change(delta)
    return encode_adapter(delta, dtype=dtype)


def _first_key(p: Prepared) -> str:
    return sorted(p.shapes)[0]


def _poison(value: float) -> Callable[[dict], None]:
    def change(delta: dict) -> None:
        tensor = delta[sorted(delta)[-1]]
        tensor.view(-1)[5] = value

    return change


def _pickle_body(p: Prepared) -> bytes:
    # Built here only to be sent; nothing in this test or the server ever unpickles it.
    return pickle.dumps({k: t.numpy() for k, t in random_delta(p.shapes, 1).items()})


def _torch_save_body(p: Prepared) -> bytes:
    buffer = io.BytesIO()
    torch.save(random_delta(p.shapes, 1), buffer)  # a zip around a pickle; never loaded
    return buffer.getvalue()


def _bad_header_json(_: Prepared) -> bytes:
    header = b"{this is not json}"
    return struct.pack("<Q", len(header)) + header + b"\0" * 64


def _raw_header(header: bytes, data: bytes = b"\0" * 64) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _edited_header(p: Prepared, key: str | None, field: str, value: Any) -> bytes:
    """The good body with one header field replaced (``key`` None: the first tensor)."""
    body = p.good_body()
    (length,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + length])
    header[key or _first_key(p)][field] = value
    return _raw_header(json.dumps(header).encode(), body[8 + length :])


BODY_CASES: dict[str, tuple[Callable[[Prepared], bytes], tuple[str, ...]]] = {
    "random-bytes": (lambda p: random.Random(0).randbytes(4096), ("safetensors header",)),
    "empty": (lambda p: b"", ("too short",)),
    "header-not-json": (_bad_header_json, ("not json",)),
    "truncated-data": (lambda p: p.good_body()[:-100], ("data_offsets", "invalid")),
    "truncated-header": (lambda p: p.good_body()[:60], ("header length", "does not fit")),
    "missing-key": (
        lambda p: _with(p, lambda d: d.pop(_first_key(p))),
        ("keys differ", "missing", "lora_a"),
    ),
    "extra-key": (
        lambda p: _with(p, lambda d: d.update({"base_model.evil.lora_A.weight": torch.zeros(2)})),
        ("keys differ", "unexpected", "evil"),
    ),
    "wrong-shape": (
        lambda p: _with(p, lambda d: d.update({_first_key(p): d[_first_key(p)].T.contiguous()})),
        ("shape", "does not match"),
    ),
    "int8": (lambda p: _with(p, lambda d: None, dtype=torch.int8), ("dtype 'I8'", "not accepted")),
    "float64": (
        lambda p: _with(p, lambda d: None, dtype=torch.float64),
        ("dtype 'F64'", "not accepted"),
    ),
    "nan": (lambda p: _with(p, _poison(math.nan)), ("nan or inf",)),
    "inf": (lambda p: _with(p, _poison(math.inf)), ("nan or inf",)),
    "neg-inf": (lambda p: _with(p, _poison(-math.inf)), ("nan or inf",)),
    # the next two were 500s: a TypeError / RecursionError escaped the validation
    "dtype-not-a-string": (lambda p: _edited_header(p, None, "dtype", ["F32"]), ("dtype",)),
    "deeply-nested-header": (lambda p: _raw_header(b"[" * 100_000), ("not json",)),
    "huge-int-in-header": (lambda p: _raw_header(b"[" + b"9" * 5000 + b"]"), ("not json",)),
    "shape-not-a-list": (lambda p: _edited_header(p, None, "shape", {"a": 1}), ("shape",)),
    "offsets-floats": (
        lambda p: _edited_header(p, None, "data_offsets", [0.0, 1.5]),
        ("data_offsets",),
    ),
    "pickle": (_pickle_body, ("safetensors header",)),
    "torch-save": (_torch_save_body, ("safetensors header",)),
}


@pytest.mark.parametrize("case", list(BODY_CASES))
def test_bad_body_is_422_and_changes_nothing(prepared: Prepared, checked, case: str) -> None:
    make_body, phrases = BODY_CASES[case]
    response = upload(checked, PY, make_body(prepared), update_headers(base_version=2))
    assert_error(response, 422, "invalid_update", *phrases)


HEADER_CASES: dict[str, tuple[dict[str, Any], int, str, tuple[str, ...]]] = {
    # name: (header changes, None removes one), status, code, phrases in the detail
    "negative-base": ({"X-FedMoE-Base-Version": "-1"}, 422, "invalid_update", ("base version -1",)),
    "future-base": ({"X-FedMoE-Base-Version": "3"}, 422, "invalid_update", ("base version 3",)),
    "base-not-int": ({"X-FedMoE-Base-Version": "two"}, 422, "invalid_request", ("base-version",)),
    "unregistered": (
        {"X-FedMoE-Worker-Id": "ghost"},
        409,
        "unknown_worker",
        ("'ghost'", "not registered"),
    ),
    "other-specialty": (
        {"X-FedMoE-Worker-Id": SQL_WORKER},
        403,
        "forbidden",
        ("registered for 'sql_expert'", "not 'python_expert'"),
    ),
    "no-worker-id": ({"X-FedMoE-Worker-Id": None}, 422, "invalid_request", ("worker-id",)),
    "no-update-id": ({"X-FedMoE-Update-Id": None}, 422, "invalid_request", ("update-id",)),
    "no-base-version": ({"X-FedMoE-Base-Version": None}, 422, "invalid_request", ("base-version",)),
    "bad-worker-id": (
        {"X-FedMoE-Worker-Id": "../etc"},
        422,
        "invalid_request",
        ("worker-id", "pattern"),
    ),
    "nan-loss": ({"X-FedMoE-Train-Loss": "nan"}, 422, "invalid_request", ("train-loss", "finite")),
    "inf-loss": ({"X-FedMoE-Train-Loss": "inf"}, 422, "invalid_request", ("train-loss", "finite")),
    "neg-inf-loss": (
        {"X-FedMoE-Train-Loss": "-inf"},
        422,
        "invalid_request",
        ("train-loss", "finite"),
    ),
    "loss-not-float": ({"X-FedMoE-Train-Loss": "low"}, 422, "invalid_request", ("train-loss",)),
    "negative-tokens": ({"X-FedMoE-Num-Tokens": "-5"}, 422, "invalid_request", ("num-tokens",)),
    # was a 500 (SQLite integer overflow) that also left a stray expert file behind
    "huge-tokens": ({"X-FedMoE-Num-Tokens": str(10**30)}, 422, "invalid_request", ("num-tokens",)),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_headers_are_refused_and_change_nothing(prepared: Prepared, checked, case: str) -> None:
    changes, status, code, phrases = HEADER_CASES[case]
    headers = update_headers(base_version=2)
    for name, value in changes.items():
        if value is None:
            del headers[name]
        else:
            headers[name] = value
    assert_error(upload(checked, PY, prepared.good_body(), headers), status, code, *phrases)


def test_unknown_expert_is_404(prepared: Prepared, checked) -> None:
    response = upload(checked, "nope_expert", prepared.good_body(), update_headers(base_version=0))
    assert_error(response, 404, "unknown_expert", "unknown expert 'nope_expert'", PY)


def test_declared_oversized_body_is_413_before_the_body_is_read(
    prepared: Prepared, checked, raw_http
) -> None:
    limit = checked.get("/v1/schema").json()["max_body_bytes"]
    headers = update_headers(base_version=2)
    for declared, sent in ((limit + 1, b""), (10**12, b"\0" * 1000)):
        # The body is (almost) never sent: a server that waited for it would time out.
        started = time.monotonic()
        status, reply_headers, body = raw_http(
            prepared.live.url,
            "POST",
            f"/v1/experts/{PY}/updates",
            {**headers, "Content-Length": str(declared)},
            sent,
            timeout=5,
        )
        assert time.monotonic() - started < 3
        assert status == 413, body
        assert reply_headers["content-type"].startswith("application/json")
        assert f"body of {declared} bytes exceeds the {limit}-byte limit" in body.decode()


def test_streamed_oversized_body_is_413(prepared: Prepared, checked) -> None:
    limit = checked.get("/v1/schema").json()["max_body_bytes"]

    def chunks():  # no Content-Length: chunked transfer, counted as it arrives
        for _ in range(2 * limit // 65536 + 1):
            yield b"\1" * 65536

    response = upload(checked, PY, chunks(), update_headers(base_version=2))
    assert_error(response, 413, "payload_too_large", f"exceeds the {limit}-byte limit")


# --- registration ----------------------------------------------------------------------------


def _registration(p: Prepared, **changes: Any) -> dict[str, Any]:
    body = {
        "worker_id": "newcomer",
        "specialty": PY,
        "base_model_fingerprint": p.fingerprint,
        "lora_config": dict(p.lora),
    }
    body.update(changes)
    return body


def test_register_unknown_specialty_is_404(prepared: Prepared, checked) -> None:
    response = checked.post("/v1/workers", json=_registration(prepared, specialty="cobol_expert"))
    assert_error(response, 404, "unknown_expert", "'cobol_expert'")


def test_register_wrong_fingerprint_is_409(prepared: Prepared, checked) -> None:
    config, _ = prepared.fingerprint.split("/")
    other_weights = f"{config}/weights:{'0' * 16}"
    response = checked.post(
        "/v1/workers", json=_registration(prepared, base_model_fingerprint=other_weights)
    )
    assert_error(response, 409, "incompatible_worker", "newcomer", "base model weights differs")
    other_format = "sha:1234"
    response = checked.post(
        "/v1/workers", json=_registration(prepared, base_model_fingerprint=other_format)
    )
    assert_error(response, 409, "incompatible_worker", "fingerprint format differs")


def test_register_different_lora_is_409(prepared: Prepared, checked) -> None:
    lora = {**prepared.lora, "rank": 4}
    response = checked.post("/v1/workers", json=_registration(prepared, lora_config=lora))
    assert_error(response, 409, "incompatible_worker", "rank: coordinator has 8, worker has 4")
    lora = {**prepared.lora, "target_modules": ["q_proj"]}
    response = checked.post("/v1/workers", json=_registration(prepared, lora_config=lora))
    assert_error(response, 409, "incompatible_worker", "target_modules")


def test_register_malformed_lora_is_422(prepared: Prepared, checked) -> None:
    lora = {**prepared.lora, "rank": -3}
    response = checked.post("/v1/workers", json=_registration(prepared, lora_config=lora))
    assert_error(response, 422, "invalid_update", "invalid lora_config", "rank")
    lora = {**prepared.lora, "colour": "red"}
    response = checked.post("/v1/workers", json=_registration(prepared, lora_config=lora))
    assert_error(response, 422, "invalid_update", "unknown lora_config keys", "colour")


# --- conditional downloads -------------------------------------------------------------------


@pytest.mark.parametrize("path", [f"/v1/experts/{PY}/adapter", "/v1/gateway/adapter"])
def test_etag_if_none_match_gives_304(checked, path: str) -> None:
    first = checked.get(path)
    assert first.status_code == 200 and first.content
    etag = first.headers["ETag"]
    version = first.headers["X-FedMoE-Version"]
    for if_none_match in (etag, f'"stale-tag", {etag}'):
        again = checked.get(path, headers={"If-None-Match": if_none_match})
        assert again.status_code == 304
        assert again.content == b""
        assert again.headers["ETag"] == etag and again.headers["X-FedMoE-Version"] == version
    other = checked.get(path, headers={"If-None-Match": '"stale-tag"'})
    assert other.status_code == 200 and other.content == first.content


def test_etag_changes_with_the_version(live_coordinator) -> None:
    with live_coordinator.client() as client:
        register(client, PY_WORKER, PY)
        tags = {
            p: client.get(p).headers["ETag"]
            for p in (f"/v1/experts/{PY}/adapter", "/v1/gateway/adapter")
        }
        body = encode_adapter(random_delta(shapes_of(client), 1))
        assert upload(client, PY, body, update_headers()).status_code == 200
        for path, old in tags.items():
            response = client.get(path, headers={"If-None-Match": old})
            assert response.status_code == 200 and response.headers["ETag"] != old


# --- idempotent retries ----------------------------------------------------------------------


def test_retried_update_id_is_applied_once(live_coordinator) -> None:
    with live_coordinator.client() as client:
        register(client, PY_WORKER, PY)
        shapes = shapes_of(client)
        headers = update_headers(update_id="retry-me-1")
        first = upload(client, PY, encode_adapter(random_delta(shapes, 1)), headers)
        assert first.status_code == 200, first.text
        assert first.json()["replayed"] is False and first.json()["version"] == 1
        state_after_first = expert_state(client, PY)
        for seed in (1, 2):  # the same body, then another body under the same id
            second = upload(client, PY, encode_adapter(random_delta(shapes, seed)), headers)
            assert second.status_code == 200, second.text
            assert second.json() == {**first.json(), "replayed": True}
        status = client.get("/v1/status").json()
        assert status["experts"][PY]["version"] == 1
        assert status["experts"][PY]["updates_applied"] == 1
        assert status["gateway"]["version"] == 1
        rows = [r for r in client.get("/v1/ledger").json() if r["update_id"] == "retry-me-1"]
        assert [(r["accepted"], r["expert_version"]) for r in rows] == [(1, 1)]
        after = expert_state(client, PY)
        assert all(torch.equal(after[k], state_after_first[k]) for k in after)


def test_an_update_id_used_by_another_worker_is_409_and_reveals_nothing(live_coordinator) -> None:
    with live_coordinator.client() as client:
        register(client, PY_WORKER, PY)
        register(client, SQL_WORKER, SQL)
        register(client, "py-worker-2", PY)
        shapes = shapes_of(client)
        body = encode_adapter(random_delta(shapes, 1))
        first = upload(client, PY, body, update_headers(update_id="taken-id-1"))
        assert first.status_code == 200, first.text
        before = client.get("/v1/status").json()["experts"]
        for worker, expert in (("py-worker-2", PY), (SQL_WORKER, SQL)):
            headers = update_headers(worker_id=worker, update_id="taken-id-1")
            response = upload(client, expert, body, headers)
            assert_error(response, 409, "duplicate_update_id", "already used")
            assert "version" not in response.json()
        assert client.get("/v1/status").json()["experts"] == before


# --- the update rule and its policies --------------------------------------------------------


def _advance(client: httpx.Client, shapes: dict, versions: int) -> None:
    """Apply ``versions`` fresh (staleness 0) updates to python_expert."""
    for base in range(versions):
        body = encode_adapter(random_delta(shapes, seed=100 + base))
        response = upload(client, PY, body, update_headers(base_version=base))
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
        register(client, PY_WORKER, PY)
        shapes = shapes_of(client)
        _advance(client, shapes, 2)
        theta = expert_state(client, PY)
        delta = random_delta(shapes, seed=5, scale=0.05)
        response = upload(client, PY, encode_adapter(delta), update_headers(base_version=0))
        assert response.status_code == 200, response.text
        ack = response.json()
        assert ack["staleness"] == 2 and ack["version"] == 3 and not ack["clipped"]
        weight = 1.0 / (1.0 + 0.1 * 2)  # s(τ) = 1/(1 + 0.1τ) at τ = 2, η = 1
        assert ack["weight"] == pytest.approx(1 / 1.2, abs=1e-12)
        _assert_applied(theta, expert_state(client, PY), delta, weight)
        on_disk = load_safetensors(
            (live_coordinator.adapters_dir / f"{PY}.v{3:010d}.safetensors").read_bytes()
        )
        _assert_applied(theta, dict(on_disk), delta, weight)


def test_clip_policy_scales_the_update_to_the_bound(live_coordinator_factory) -> None:
    bound, lr = 0.5, 0.8
    live = live_coordinator_factory(max_update_norm=bound, norm_policy="clip", server_lr=lr)
    with live.client() as client:
        register(client, PY_WORKER, PY)
        shapes = shapes_of(client)
        body = encode_adapter(random_delta(shapes, seed=9, scale=1e-4))
        assert upload(client, PY, body, update_headers()).status_code == 200  # under the bound
        theta = expert_state(client, PY)
        delta = random_delta(shapes, seed=11, scale=0.1)
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))
        assert norm > bound
        response = upload(client, PY, encode_adapter(delta), update_headers(base_version=0))
        assert response.status_code == 200, response.text
        ack = response.json()
        assert ack["clipped"] is True and ack["staleness"] == 1
        assert ack["update_norm"] == pytest.approx(norm, rel=1e-6)
        weight = lr * (1 / 1.1) * (bound / norm)  # η · s(1) · (bound / ‖Δ‖)
        assert ack["weight"] == pytest.approx(weight, rel=1e-9)
        _assert_applied(theta, expert_state(client, PY), delta, weight)


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
        register(client, PY_WORKER, PY)
        _advance(client, shapes_of(client), 1)
        before = snapshot(live, client)
        delta = random_delta(shapes_of(client), seed=11, scale=0.1)
        headers = update_headers(base_version=1, update_id="too-big")
        response = upload(client, PY, encode_adapter(delta), headers)
        assert_error(response, 422, "rejected_update", "exceeds max_update_norm 0.5")
        after = snapshot(live, client)
        _assert_only_rejection_recorded(before, after)
        _assert_rejected_row(client, "too-big", "exceeds max_update_norm")


def test_update_staler_than_max_staleness_is_409(live_coordinator_factory) -> None:
    live = live_coordinator_factory(max_staleness=1)
    with live.client() as client:
        register(client, PY_WORKER, PY)
        shapes = shapes_of(client)
        _advance(client, shapes, 2)
        before = snapshot(live, client)
        headers = update_headers(base_version=0, update_id="too-old")
        response = upload(client, PY, encode_adapter(random_delta(shapes, 3)), headers)
        assert_error(response, 409, "stale_update", "staleness 2 exceeds max_staleness 1")
        after = snapshot(live, client)
        _assert_only_rejection_recorded(before, after)
        _assert_rejected_row(client, "too-old", "staleness 2")
        # staleness 1 is still accepted, at weight s(1)
        response = upload(
            client, PY, encode_adapter(random_delta(shapes, 3)), update_headers(base_version=1)
        )
        assert response.status_code == 200 and response.json()["staleness"] == 1


def test_update_that_would_overflow_float32_is_422(live_coordinator_factory) -> None:
    """Each delta is finite, but θ + w·Δ would be Inf: refused, nothing stored."""
    live = live_coordinator_factory(server_lr=2.0)
    with live.client() as client:
        register(client, PY_WORKER, PY)
        shapes = shapes_of(client)
        huge = {k: torch.full(s, 3.0e38) for k, s in shapes.items()}  # < float32 max 3.4e38
        before = snapshot(live, client)
        response = upload(client, PY, encode_adapter(huge), update_headers())
        assert_error(response, 422, "invalid_update", "non-finite", "float32 overflow")
        assert_unchanged(before, snapshot(live, client))
        state = expert_state(client, PY)
        assert all(torch.isfinite(t).all() for t in state.values())


def test_overflow_accumulated_over_two_updates_is_422(live_coordinator) -> None:
    """Each update alone is fine; the second would push θ past float32's max: refused."""
    with live_coordinator.client() as client:
        register(client, PY_WORKER, PY)
        shapes = shapes_of(client)
        big = encode_adapter({k: torch.full(s, 2.0e38) for k, s in shapes.items()})
        first = upload(client, PY, big, update_headers(base_version=0))
        assert first.status_code == 200, first.text
        before = snapshot(live_coordinator, client)
        second = upload(client, PY, big, update_headers(base_version=1))
        assert_error(second, 422, "invalid_update", "float32 overflow")
        assert_unchanged(before, snapshot(live_coordinator, client))
