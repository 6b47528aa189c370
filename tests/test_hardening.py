"""Issue 10: each hole an outside attack found, reproduced over real HTTP on loopback.

Every test here failed against the coordinator before its fix (see the report of
the branch that added them); each names the item of the issue it covers.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors

from fedmoe.adapters import encode_adapter
from tests.api_helpers import (
    PY,
    PY_WORKER,
    SQL,
    assert_error,
    assert_unchanged,
    delta_body,
    random_delta,
    register,
    registration_body,
    shapes_of,
    snapshot,
    update_headers,
    upload,
)

TOKEN = "hardening-admin-token-0123456789"
W1_TOKEN = "hardening-w1-token-0123456789"
W2_TOKEN = "hardening-w2-token-0123456789"


# --- a raw HTTP/1.1 connection that keeps itself open ----------------------------------------


class RawConnection:
    """A keep-alive socket: send a request head (and maybe part of a body), read one answer."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.host = f"{host}:{port}"
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buffer = b""

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_head(self, method: str, path: str, headers: dict[str, str]) -> float:
        """Send a request head; when it was sent (``time.monotonic()``)."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return time.monotonic()

    def read_response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection without an answer"
            self.buffer += chunk
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {n.strip().lower(): v.strip() for n, _, v in (x.partition(":") for x in lines)}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection mid-answer"
            rest += chunk
        self.buffer = rest[length:]
        return int(status_line.split()[1]), headers, rest[:length]

    def closed_by_server(self, within: float) -> bool:
        """True when the server closes (EOF or reset) within ``within`` seconds."""
        self.sock.settimeout(within)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hardening-tokens") / "tokens.json"
    entries = [
        {"token": TOKEN, "role": "admin"},
        {"token": W1_TOKEN, "role": "worker", "worker_id": "w1", "experts": [PY]},
        {"token": W2_TOKEN, "role": "worker", "worker_id": "w2"},
    ]
    path.write_text(json.dumps({"tokens": entries}))
    return path


@pytest.fixture(scope="module")
def guarded(module_coordinator_factory, tokens_file):
    """A coordinator with per-worker tokens and short timeouts (shared by most tests here)."""
    live = module_coordinator_factory(tokens_file=tokens_file, header_timeout=1.5, body_timeout=1.5)
    with live.client(TOKEN) as admin:
        register(admin, PY_WORKER, PY)
    return live


def _upload_head(worker_id: str = PY_WORKER, **extra: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {TOKEN}",
        "X-FedMoE-Worker-Id": worker_id,
        "X-FedMoE-Update-Id": uuid.uuid4().hex,
        "X-FedMoE-Base-Version": "0",
        **extra,
    }


# --- 1. body limits on every route that reads a body ------------------------------------------


def test_registration_body_limit_is_checked_before_and_while_reading(guarded) -> None:
    """Item 1: a registration declaring 1 GB is 413 at once; a chunked flood is cut off."""
    declared = {"Authorization": f"Bearer {TOKEN}", "Content-Length": str(10**9)}
    with RawConnection(guarded.url) as connection:
        started = connection.send_head("POST", "/v1/workers", declared)
        status, _, body = connection.read_response()
        assert status == 413, body
        assert "exceeds the 16384-byte limit" in json.loads(body)["detail"]
        assert time.monotonic() - started < 3

    def flood():  # chunked, never a Content-Length: must be counted as it arrives
        for _ in range(64):
            yield b" " * 65536

    with guarded.client(TOKEN) as admin:
        response = admin.post(
            "/v1/workers", content=flood(), headers={"Content-Type": "application/json"}
        )
    assert_error(response, 413, "payload_too_large", "16384-byte limit")


# --- 2. early refusals close the connection ---------------------------------------------------


@pytest.mark.parametrize("refusal", ["401", "413", "403"])
def test_early_refusals_close_the_connection_without_reading_the_body(guarded, refusal) -> None:
    """Item 2: after 401/413/403 the server closes; it never waits for the declared body."""
    headers = _upload_head(**{"Content-Length": "60000"})  # under the upload limit
    if refusal == "401":
        headers["Authorization"] = "Bearer wrong-wrong-wrong-wrong"
    elif refusal == "413":
        headers["Content-Length"] = str(10**12)
    else:  # a worker token acting as another worker
        headers["Authorization"] = f"Bearer {W2_TOKEN}"
    with RawConnection(guarded.url) as connection:
        connection.send_head("POST", f"/v1/experts/{PY}/updates", headers)
        status, reply, _ = connection.read_response()
        assert status == int(refusal)
        assert reply.get("connection", "").lower() == "close"
        assert connection.closed_by_server(within=3.0)


# --- 3. no merge publishes a non-finite tensor --------------------------------------------------


@pytest.mark.parametrize("method", ["svd", "linear", "cat"])
def test_no_merge_publishes_a_non_finite_gateway(live_coordinator_factory, method) -> None:
    """Item 3: an update of 3.0e38 everywhere keeps every expert and the gateway finite."""
    live = live_coordinator_factory(merge_method=method)
    with live.client() as client:
        register(client, PY_WORKER, PY)
        huge = {k: torch.full(s, 3.0e38) for k, s in shapes_of(client).items()}
        before = snapshot(live, client)
        response = upload(client, PY, encode_adapter(huge), update_headers())
        if method == "svd":  # sqrt of the singular values overflows float32: refused
            assert_error(response, 422, "invalid_update", "gateway", "non-finite")
            assert_unchanged(before, snapshot(live, client))
        else:  # averaging and stacking cannot overflow: accepted
            assert response.status_code == 200, response.text
        gateway = load_safetensors(client.get("/v1/gateway/adapter").content)
        assert all(torch.isfinite(t).all() for t in gateway.values())


# --- 4. one worker by key; bounded registrations; a paged worker list ---------------------------


def test_an_update_looks_up_one_worker_not_the_table(live_coordinator) -> None:
    """Item 4: the SQL an upload runs never reads the whole workers table."""
    statements: list[str] = []
    with live_coordinator.client() as client:
        for index in range(5):
            register(client, f"other-{index}", SQL)
        register(client, PY_WORKER, PY)
        body = delta_body(client, 1)
        live_coordinator.coordinator.ledger._db.set_trace_callback(statements.append)
        try:
            assert upload(client, PY, body, update_headers()).status_code == 200
        finally:
            live_coordinator.coordinator.ledger._db.set_trace_callback(None)
    reads = [s for s in statements if "FROM workers" in s]
    assert any("WHERE worker_id" in s for s in reads), reads  # the sender's own row
    db = live_coordinator.coordinator.ledger._db
    for statement in reads:  # and an index for every other read (the workers who joined)
        plan = [row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}")]
        assert not any(step.startswith("SCAN workers") for step in plan), (statement, plan)


def test_registrations_are_bounded_and_idle_workers_forgotten(live_coordinator_factory) -> None:
    """Item 4: past max_workers a new worker gets 429; one idle past worker_ttl is forgotten."""
    live = live_coordinator_factory(max_workers=2, worker_ttl=1.0)
    with live.client() as client:
        register(client, "a", PY)
        register(client, "b", PY)
        register(client, "a", PY)  # an existing worker may always re-register
        refused = client.post("/v1/workers", json=registration_body(client, "c"))
        assert_error(refused, 429, "too_many_workers", "2 workers", "max_workers")
        time.sleep(1.2)
        register(client, "c", PY)  # a and b were forgotten after worker_ttl
        assert sorted(client.get("/v1/status").json()["workers"]) == ["c"]


def test_status_pages_the_worker_list(live_coordinator) -> None:
    """Item 4: ``?workers_limit=&workers_offset=`` pages the workers; the default lists all."""
    with live_coordinator.client() as client:
        for name in ("w-a", "w-b", "w-c", "w-d"):
            register(client, name, PY)
        page = client.get("/v1/status", params={"workers_limit": 2, "workers_offset": 1}).json()
        assert list(page["workers"]) == ["w-b", "w-c"]
        assert page["workers_total"] == 4
        assert page["experts"][PY]["worker_count"] == 4
        everything = client.get("/v1/status").json()
        assert list(everything["workers"]) == ["w-a", "w-b", "w-c", "w-d"]


# --- 5. a client that disconnects mid-upload ----------------------------------------------------


def test_client_disconnect_mid_upload_logs_one_line(guarded, caplog) -> None:
    """Item 5: one log line, no traceback."""
    caplog.set_level(logging.INFO)
    uvicorn_error = logging.getLogger("uvicorn.error")
    uvicorn_error.addHandler(caplog.handler)
    try:
        connection = RawConnection(guarded.url)
        connection.send_head(
            "POST", f"/v1/experts/{PY}/updates", _upload_head(**{"Content-Length": str(100_000)})
        )
        connection.sock.sendall(b"\0" * 1000)
        time.sleep(0.3)
        connection.close()
        time.sleep(1.0)
    finally:
        uvicorn_error.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    lines = [r.getMessage() for r in caplog.records if "disconnect" in r.getMessage().lower()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]


# --- 6. a worker's expert is part of its identity -----------------------------------------------


def test_a_worker_token_may_not_move_its_worker_to_another_expert(guarded) -> None:
    """Item 6: tokens-file ``experts`` bind a worker; re-registering elsewhere needs an admin."""
    with guarded.client(W1_TOKEN) as w1:
        register(w1, "w1", PY)
        response = w1.post("/v1/workers", json=registration_body(w1, "w1", SQL))
        assert_error(response, 403, "forbidden", "w1", "may train only", PY)
    with guarded.client(W2_TOKEN) as w2:
        register(w2, "w2", PY)
        response = w2.post("/v1/workers", json=registration_body(w2, "w2", SQL))
        assert_error(response, 403, "forbidden", "registered for 'python_expert'", "admin token")
        assert w2.get("/v1/status").json()["workers"]["w2"]["specialty"] == PY
    with guarded.client(TOKEN) as admin:
        register(admin, "w2", SQL)  # an admin may move it


# --- 7. an update id reused with another body ---------------------------------------------------


def test_a_reused_update_id_with_another_body_is_409(live_coordinator) -> None:
    """Item 7: same id and body: the replay; same id, other body: 409 that says so."""
    with live_coordinator.client() as client:
        register(client, PY_WORKER, PY)
        shapes = shapes_of(client)
        body = encode_adapter(random_delta(shapes, 1))
        headers = update_headers(update_id="reused-id-1")
        first = upload(client, PY, body, headers)
        assert first.status_code == 200, first.text
        again = upload(client, PY, body, headers)
        assert again.json() == {**first.json(), "replayed": True}
        other = upload(client, PY, encode_adapter(random_delta(shapes, 2)), headers)
        assert_error(other, 409, "duplicate_update_id", "reused-id-1", "different body")


# --- 8. typed registrations and HTTP's If-None-Match --------------------------------------------


@pytest.mark.parametrize(
    ("lora_change", "phrases"),
    [
        ("empty", ("lora_config.rank", "field required")),
        ("seed-float", ("lora_config.seed", "integer")),
        ("rank-string", ("lora_config.rank", "integer")),
        ("modules-empty", ("lora_config.target_modules", "at least 1")),
        ("modules-not-names", ("lora_config.target_modules",)),
    ],
)
def test_registrations_are_validated_by_a_typed_schema(guarded, lora_change, phrases) -> None:
    """Item 8: ``{}`` and loose types are refused by name, never with a Python TypeError."""
    with guarded.client(TOKEN) as admin:
        body = registration_body(admin, "typed-worker")
        lora = body["lora_config"]
        changed = {
            "empty": {},
            "seed-float": {**lora, "seed": 1.5},
            "rank-string": {**lora, "rank": "8"},
            "modules-empty": {**lora, "target_modules": []},
            "modules-not-names": {**lora, "target_modules": [1, {"a": 2}]},
        }[lora_change]
        response = admin.post("/v1/workers", json={**body, "lora_config": changed})
        assert_error(response, 422, "invalid_request", *phrases)
        assert "__init__" not in response.text and "TypeError" not in response.text


@pytest.mark.parametrize("path", [f"/v1/experts/{PY}/adapter", "/v1/gateway/adapter"])
def test_if_none_match_star_and_weak_etags_give_304(guarded, path) -> None:
    """Item 8: ``*`` matches any current representation; weak comparison for GET."""
    with guarded.client(TOKEN) as client:
        etag = client.get(path).headers["ETag"]
        for value in ("*", f"W/{etag}", f'"other", W/{etag}'):
            response = client.get(path, headers={"If-None-Match": value})
            assert response.status_code == 304, value


# --- 9. the OpenAPI document tells the truth ------------------------------------------------------


def test_openapi_documents_security_errors_and_binary_bodies(guarded) -> None:
    """Item 9 (the fuzz over it is in test_fuzz.py)."""
    spec = httpx.get(f"{guarded.url}/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert any(s["type"] == "http" and s["scheme"] == "bearer" for s in schemes.values())
    upload_op = spec["paths"]["/v1/experts/{name}/updates"]["post"]
    assert {"401", "403", "413", "503"} <= set(upload_op["responses"])
    assert upload_op["security"]
    loss = next(p for p in upload_op["parameters"] if p["name"] == "X-FedMoE-Train-Loss")
    assert "number" in json.dumps(loss["schema"])
    assert {"401", "413"} <= set(spec["paths"]["/v1/workers"]["post"]["responses"])
    assert "403" in spec["paths"]["/v1/ledger"]["get"]["responses"]
    for path in ("/v1/status", "/v1/schema", "/v1/ledger"):
        ok = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
        assert "$ref" in json.dumps(ok["schema"]), path
    for path in ("/v1/experts/{name}/adapter", "/v1/gateway/adapter"):
        ok = spec["paths"][path]["get"]["responses"]["200"]["content"]
        assert ok["application/octet-stream"]["schema"]["format"] == "binary", path
        assert "application/json" not in ok, path


# --- 10. slow clients ---------------------------------------------------------------------------


def test_headers_sent_a_byte_at_a_time_are_cut_off(guarded) -> None:
    """Item 10: slowloris; headers must arrive within header_timeout (1.5 s here)."""
    connection = RawConnection(guarded.url)
    head = f"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    started = time.monotonic()
    closed_at = None
    try:
        for byte in head.encode() * 10:  # never ends with a blank line
            try:
                connection.sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_at = time.monotonic()
                break
            if connection.closed_by_server(within=0.25):
                closed_at = time.monotonic()
                break
            if time.monotonic() - started > 6:
                break
    finally:
        connection.close()
    assert closed_at is not None and closed_at - started < 4, "slow headers kept the connection"


def test_a_stalled_body_is_cut_off(guarded) -> None:
    """Item 10: a body that stops arriving gets 408 and the connection closes."""
    head = _upload_head(**{"Content-Length": "100000"})
    with RawConnection(guarded.url) as connection:
        started = connection.send_head("POST", f"/v1/experts/{PY}/updates", head)
        connection.sock.sendall(b"\0" * 100)
        status, reply, _ = connection.read_response()
        assert status == 408 and reply.get("connection") == "close"
        assert time.monotonic() - started < 4
        assert connection.closed_by_server(within=2.0)
