"""Helpers for the HTTP API tests: uploads, registration and snapshots of a coordinator's state."""

from __future__ import annotations

import hashlib
import sqlite3
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import load as load_safetensors

from fedmoe.adapters import encode_adapter, read_header
from fedmoe.client import CoordinatorClient
from fedmoe.schemas import UpdateAck

PY, SQL = "python_expert", "sql_expert"
PY_WORKER, SQL_WORKER = "py-worker", "sql-worker"
LEDGER_TABLES = ("meta", "experts", "gateway", "workers", "updates")


# --- helpers ---------------------------------------------------------------------------------


def shapes_of(client: httpx.Client) -> dict[str, list[int]]:
    return client.get("/v1/schema").json()["tensors"]


def random_delta(shapes: dict[str, list[int]], seed: int, scale: float = 1e-3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) * scale for k, s in shapes.items()}


def registration_body(client: httpx.Client, worker_id: str, specialty: str = PY) -> dict:
    """A ``POST /v1/workers`` body that matches the server's base model and LoRA config."""
    info = client.get("/v1/schema").json()
    return {
        "worker_id": worker_id,
        "specialty": specialty,
        "base_model_fingerprint": info["base_model_fingerprint"],
        "lora_config": info["lora_config"],
    }


def delta_body(client: httpx.Client, seed: int) -> bytes:
    """A random float32 delta of the server's adapter shapes, as a safetensors body."""
    return encode_adapter(random_delta(shapes_of(client), seed))


def register(client: httpx.Client, worker_id: str, specialty: str) -> dict[str, Any]:
    response = client.post("/v1/workers", json=registration_body(client, worker_id, specialty))
    assert response.status_code == 200, response.text
    return response.json()


def register_workers(
    client: CoordinatorClient, workers: Iterable[str], specialty: str
) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """Register ``workers`` for ``specialty`` through the typed client; the tensor shapes
    and the expert's current state."""
    schema = client.schema()
    shapes = {k: tuple(v) for k, v in schema.tensors.items()}
    for worker in workers:
        client.register(
            worker_id=worker,
            specialty=specialty,
            fingerprint=schema.base_model_fingerprint,
            lora_config=schema.lora_config,
        )
    _, state = client.expert_adapter(specialty, shapes)
    return shapes, state


def upload_delta(
    client: CoordinatorClient, expert: str, worker: str, uid: str, delta: dict, base: int
) -> UpdateAck:
    """Upload ``delta`` (float32) through the typed client: 8 tokens, train loss 1."""
    return client.upload(
        expert,
        encode_adapter(delta),
        worker_id=worker,
        update_id=uid,
        base_version=base,
        num_tokens=8,
        train_loss=1.0,
    )


def eval_report(
    expert_loss: float = 2.0,
    gateway_loss: float = 3.0,
    tokens: int = 100,
    examples: int = 4,
    **overrides: Any,
) -> dict[str, Any]:
    """A ``POST /v1/metrics/evaluations`` body: PY_WORKER's expert and gateway losses on PY."""
    report = {
        "worker_id": PY_WORKER,
        "expert": PY,
        "expert_version": 0,
        "gateway_version": 0,
        "results": [
            {"kind": "expert", "loss": expert_loss, "tokens": tokens, "examples": examples},
            {"kind": "gateway", "loss": gateway_loss, "tokens": tokens, "examples": examples},
        ],
    }
    return report | overrides


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
    """Wait until the background writer has saved the current gateway version.

    The gateway is merged lazily (only when downloaded), so download it first.
    """
    path = live.adapters_dir / "gateway.safetensors"
    assert client.get("/v1/gateway/adapter").status_code == 200
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
        "log": hash_files(live.state_dir / "wal"),
    }


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in before:
        assert after[key] == before[key], f"{key} changed"
