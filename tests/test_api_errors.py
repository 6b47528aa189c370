"""Bad inputs to the HTTP API: the right 4xx, a JSON error naming the problem, no state change.

Every test talks to a real coordinator over loopback HTTP (``tests/conftest.py``)
and compares the coordinator's state before and after: versions (GET /v1/status),
the ledger (GET /v1/ledger and the SQLite file itself) and the sha256 of every
file under ``state_dir/adapters``, the gateway file included once its background
writer has settled on the current gateway version.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from fedmoe.adapters import encode_adapter
from tests.api_helpers import (
    PY,
    PY_WORKER,
    SQL,
    SQL_WORKER,
    assert_error,
    assert_unchanged,
    eval_report,
    random_delta,
    register,
    snapshot,
    update_headers,
    upload,
)

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
    "negative-loss": ({"X-FedMoE-Train-Loss": "-0.5"}, 422, "invalid_request", (">= 0",)),
    "float-base-version": (
        {"X-FedMoE-Base-Version": "2.0"},
        422,
        "invalid_request",
        ("base-version", "plain decimal"),
    ),
    "signed-tokens": ({"X-FedMoE-Num-Tokens": "+10"}, 422, "invalid_request", ("plain decimal",)),
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
    # validated by the typed schema of the request body (fedmoe.schemas.LoraConfigBody)
    lora = {**prepared.lora, "rank": -3}
    response = checked.post("/v1/workers", json=_registration(prepared, lora_config=lora))
    assert_error(response, 422, "invalid_request", "lora_config.rank", "greater than or equal to 1")
    lora = {**prepared.lora, "colour": "red"}
    response = checked.post("/v1/workers", json=_registration(prepared, lora_config=lora))
    assert_error(response, 422, "invalid_request", "lora_config.colour", "extra inputs")


# --- conditional downloads (no state change) ------------------------------------------------


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


def test_405_lists_every_method_of_the_path(checked) -> None:
    """A path served by two routes (GET and POST) names both in ``Allow``, as HTTP says."""
    response = checked.request("OPTIONS", f"/v1/experts/{PY}/signature")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET, POST"


# integers past what SQLite (and a float) can hold: schemathesis found the first one as a 500
HUGE = 36825181930308069272584192


def test_integers_beyond_storage_range_are_422(prepared: Prepared, checked) -> None:
    response = checked.get("/v1/metrics/updates", params={"after": HUGE})
    assert_error(response, 422, "invalid_request", "after")
    report = eval_report(expert_version=HUGE)
    response = checked.post("/v1/metrics/evaluations", json=report)
    assert_error(response, 422, "invalid_request", "expert_version")
    signature = {"mean": [0.0], "var": [0.0], "count": HUGE, "featurizer": {}}
    body = {"worker_id": PY_WORKER, "signature": signature | {"base_fingerprint": "x"}}
    response = checked.post(f"/v1/experts/{PY}/signature", json=body)
    assert_error(response, 422, "invalid_request", "count")
