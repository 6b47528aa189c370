"""Property-based fuzzing of the whole HTTP API from its OpenAPI schema (schemathesis 4).

A real coordinator (uvicorn on loopback, tmp state dir, a bearer token) is fuzzed over
HTTP with schema-conforming and schema-violating requests for every operation, under
every check schemathesis has: no 5xx, every status, header, body and content type as
documented, violating data refused, conforming data accepted, and the bearer scheme
enforced (requests without the token or with a wrong one must get 401).

A worker is registered first, and every generated upload, registration and
download is replayed with that worker's valid headers / the real expert name /
the real fingerprint, so random bodies reach the safetensors validation, the
update rule and the LoRA comparison instead of stopping at "unknown worker".
A second, plain Hypothesis test mutates valid safetensors uploads (header JSON
fields, bytes, length prefix, truncation) to probe the parser more deeply.

The schema is built at import time from the app's own routes (its OpenAPI does
not depend on the coordinator object), because schemathesis' lazy
``from_fixture`` loader does not run under pytest 9; ``test_served_schema_is_the_fuzzed_one``
checks that the server publishes exactly that document.
"""

from __future__ import annotations

import json
import os
import struct
import uuid

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig

from fedmoe.adapters import encode_adapter
from fedmoe.api.app import create_app
from fedmoe.coordinator.auth import TokenRegistry

pytestmark = pytest.mark.heavy(12)  # run early (tests/conftest.py)

WORKER, EXPERT = "fuzz-worker", "python_expert"
TOKEN = "fuzz-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# FEDMOE_FUZZ_EXAMPLES=500 for a longer hunt than CI's
FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("FEDMOE_FUZZ_EXAMPLES", "20")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)

OPENAPI = create_app(None, TokenRegistry({})).openapi()  # type: ignore[arg-type]
# Conforming data may still be refused with 422 where no schema can say what is valid:
# an upload's bytes must be a safetensors file of this adapter's exact keys and shapes,
# and its base version must be one the expert has reached.
CONFIG = SchemathesisConfig.from_dict(
    {
        "auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN}}},
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]
            }
        },
    }
)
schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG)


@pytest.fixture(scope="module")
def fuzzed(module_coordinator_factory):
    """A coordinator (no auth) with ``WORKER`` registered for ``EXPERT``."""
    live = module_coordinator_factory(auth_token=TOKEN)
    with live.client() as client:
        info = client.get("/v1/schema").json()
        response = client.post("/v1/workers", json=_registration(info, WORKER))
        assert response.status_code == 200, response.text
    live.info = info
    return live


def _registration(info: dict, worker_id: str, **changes) -> dict:
    body = {
        "worker_id": worker_id,
        "specialty": EXPERT,
        "base_model_fingerprint": info["base_model_fingerprint"],
        "lora_config": info["lora_config"],
    }
    return {**body, **changes}


def test_served_schema_is_the_fuzzed_one(fuzzed) -> None:
    assert httpx.get(f"{fuzzed.url}/openapi.json").json() == OPENAPI


@schema.parametrize()
@FUZZ_SETTINGS
def test_no_server_errors(case, fuzzed) -> None:
    _short_waits(case)
    case.call_and_validate(base_url=fuzzed.url)
    deeper = _deeper(case, fuzzed)
    if deeper is not None:
        deeper.call_and_validate(base_url=fuzzed.url)


def _short_waits(case) -> None:
    """A download may wait up to 10 s for a version (``wait``): shortened to keep the run
    brief (tests/test_incremental_pull.py checks the wait itself)."""
    wait = (case.query or {}).get("wait")
    if isinstance(wait, (int, float)) and not isinstance(wait, bool) and 0.2 < wait <= 10:
        case.query["wait"] = 0.2


def _deeper(case, fuzzed):
    """The same case with the identifiers a real worker would send, or None."""
    operation = (case.method.upper(), case.operation.path)
    if operation == ("POST", "/v1/experts/{name}/updates"):
        headers = dict(case.headers or {})
        headers["X-FedMoE-Worker-Id"] = WORKER
        headers["X-FedMoE-Base-Version"] = "0"
        headers.setdefault("X-FedMoE-Update-Id", uuid.uuid4().hex)
        return _replace(case, headers=headers, path_parameters={"name": EXPERT})
    if operation == ("GET", "/v1/experts/{name}/adapter"):
        return _replace(case, path_parameters={"name": EXPERT})
    if operation == ("POST", "/v1/workers") and isinstance(case.body, dict):
        body = {**case.body, "specialty": EXPERT}
        body["base_model_fingerprint"] = fuzzed.info["base_model_fingerprint"]
        return _replace(case, body=body)
    return None


def _replace(case, **changes):
    clone = case.operation.Case(
        path_parameters=dict(case.path_parameters or {}),
        headers=dict(case.headers or {}),
        query=dict(case.query or {}),
        body=case.body,
        media_type=case.media_type,
    )
    for name, value in changes.items():
        setattr(clone, name, value)
    return clone


# --- mutated safetensors uploads -------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """A valid safetensors body with one random mutation."""
    (header_len,) = struct.unpack("<Q", valid[:8])
    header = json.loads(valid[8 : 8 + header_len])
    data = valid[8 + header_len :]
    kind = draw(st.sampled_from(["field", "entry", "bytes", "truncate", "length"]))
    if kind in ("field", "entry"):
        key = draw(st.sampled_from([*sorted(header), "__metadata__", "extra"]))
        if kind == "entry" or not isinstance(header.get(key), dict):
            header[key] = draw(JSON_VALUES)
        else:
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            header[key][field] = draw(JSON_VALUES)
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + data
    if kind == "bytes":
        body = bytearray(valid)
        for position in draw(st.lists(st.integers(0, len(body) - 1), min_size=1, max_size=6)):
            body[position] = draw(st.integers(0, 255))
        return bytes(body)
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + valid[8:]


@pytest.fixture(scope="module")
def valid_body(fuzzed) -> bytes:
    generator = torch.Generator().manual_seed(0)
    shapes = fuzzed.info["tensors"]
    return encode_adapter(
        {k: torch.randn(s, generator=generator) * 1e-3 for k, s in shapes.items()}
    )


@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_uploads_are_accepted_or_422(fuzzed, valid_body, data) -> None:
    body = data.draw(mutated(valid_body), label="body")
    headers = {
        "X-FedMoE-Worker-Id": WORKER,
        "X-FedMoE-Update-Id": uuid.uuid4().hex,
        "X-FedMoE-Base-Version": "0",
    }
    response = httpx.post(
        f"{fuzzed.url}/v1/experts/{EXPERT}/updates",
        content=body,
        headers={**headers, **AUTH},
        timeout=30,
    )
    assert response.status_code in (200, 422), response.text
    if response.status_code == 422:
        assert response.json()["error"] == "invalid_update"


def test_state_is_consistent_after_fuzzing(fuzzed) -> None:
    """Whatever was accepted, versions match the ledger and every expert is finite."""
    with fuzzed.client() as client:
        status = client.get("/v1/status").json()
        ledger = client.get("/v1/ledger", params={"limit": 10000}).json()
        for name, expert in status["experts"].items():
            accepted = [r for r in ledger if r["expert"] == name and r["accepted"]]
            assert expert["version"] == expert["updates_applied"] == len(accepted)
            response = client.get(f"/v1/experts/{name}/adapter")
            assert response.status_code == 200
        total = sum(e["version"] for e in status["experts"].values())
        assert status["gateway"]["version"] == total
        assert client.get("/healthz").json() == {"status": "ok"}
