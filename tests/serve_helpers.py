"""Helpers for the ``fedmoe serve`` tests: experts set deterministically, a live server."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx
import uvicorn

from fedmoe.api.server import listen_socket
from fedmoe.client import CoordinatorClient
from fedmoe.data import parse_record
from fedmoe.demo_data import generate_domain
from fedmoe.featurizer import request_text
from fedmoe.modeling import BaseModel
from fedmoe.serve.app import create_serve_app
from fedmoe.serve.server import token_registry
from fedmoe.serve.service import Service
from fedmoe.serve.settings import ServeSettings
from fedmoe.tiny import build_tiny_tokenizer
from fedmoe.worker.signing import share_signature
from tests.api_helpers import random_delta, register, update_headers, upload

EXPERTS = ("python_expert", "sql_expert", "docs_expert")


def push_expert(client: httpx.Client, expert: str, seed: int, scale: float = 0.3) -> int:
    """Apply one deterministic delta to ``expert`` (registering its worker); the new version."""
    worker = f"w-{expert}"
    register(client, worker, expert)
    version = client.get("/v1/experts").json()
    base = {item["name"]: item["version"] for item in version}[expert]
    shapes = client.get("/v1/schema").json()["tensors"]
    from fedmoe.adapters import encode_adapter

    body = encode_adapter(random_delta(shapes, seed, scale))
    response = upload(client, expert, body, update_headers(worker, base_version=base))
    assert response.status_code == 200, response.text
    return int(response.json()["version"])


def sign_experts(url: str, base: BaseModel, count: int = 100) -> None:
    """Each expert's worker shares its domain signature (demo data), as workers do."""
    with CoordinatorClient(url) as client:
        for expert in EXPERTS:
            examples = [parse_record(r) for r in generate_domain(expert, count, seed=1)]
            ack = share_signature(
                client,
                worker_id=f"w-{expert}",
                specialty=expert,
                model=base.model,
                tokenizer=base.tokenizer,
                fingerprint=base.fingerprint,
                examples=examples,
            )
            assert ack is not None and ack["count"] == count


def held_out_prompts(expert: str, count: int) -> list[str]:
    """Request texts of demo records the signatures were not computed from."""
    tokenizer = build_tiny_tokenizer()
    records = generate_domain(expert, count, seed=7)
    return [request_text(parse_record(r), tokenizer) for r in records]


@dataclass
class LiveServe:
    """A running ``fedmoe serve`` app on loopback."""

    url: str
    service: Service
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        """Stop uvicorn and the engine."""
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.service.close()


def start_serve(**settings: object) -> LiveServe:
    """``Service.open`` + the app under uvicorn in a thread, as ``fedmoe serve`` runs it."""
    config = ServeSettings(host="127.0.0.1", port=0, **settings)  # type: ignore[arg-type]
    service = Service.open(config)
    app = create_serve_app(service, token_registry(config))
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            service.close()
            raise RuntimeError("fedmoe serve did not start")
        time.sleep(0.01)
    return LiveServe(f"http://127.0.0.1:{port}", service, server, thread)
