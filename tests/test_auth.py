"""Authentication, authorisation, safe defaults and TLS, over real HTTP on loopback."""

from __future__ import annotations

import ast
import datetime
import hashlib
import ipaddress
import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from fedmoe.adapters import encode_adapter
from fedmoe.cli import app
from fedmoe.client import ApiError, CoordinatorClient
from fedmoe.coordinator.settings import CoordinatorSettings
from tests.api_helpers import registration_body

TOKEN = "shared-admin-token-0123456789"
ADMIN_TOKEN = "admin-token-abcdefghijklmnop"
W1_TOKEN = "worker-one-token-0123456789"
W2_TOKEN = "worker-two-token-9876543210"
PY = "python_expert"
FEDMOE_ROOT = Path(__file__).resolve().parents[1] / "fedmoe"


def _update(client: httpx.Client, worker_id: str, base_version: int = 0) -> httpx.Response:
    shapes = client.get("/v1/schema").json()["tensors"]
    body = encode_adapter({k: torch.full(s, 1e-3) for k, s in shapes.items()})
    headers = {
        "X-FedMoE-Worker-Id": worker_id,
        "X-FedMoE-Update-Id": uuid.uuid4().hex,
        "X-FedMoE-Base-Version": str(base_version),
    }
    return client.post(f"/v1/experts/{PY}/updates", content=body, headers=headers)


def _assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.request.url, response.text)
    assert response.json()["error"] == "unauthorized"
    assert response.json()["detail"].startswith("missing or invalid bearer token")
    assert "FEDMOE_AUTH_TOKEN" in response.json()["detail"]
    assert response.headers["www-authenticate"].lower().startswith("bearer")


# --- a shared token --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(module_coordinator_factory):
    return module_coordinator_factory(auth_token=TOKEN)


def _v1_operations(url: str) -> list[tuple[str, str]]:
    """Every (method, path) of the API under /v1, from its OpenAPI document."""
    spec = httpx.get(f"{url}/openapi.json").json()
    operations = [
        (method.upper(), path.replace("{name}", PY))
        for path, item in spec["paths"].items()
        for method in item
        if path.startswith("/v1")
    ]
    assert len(operations) >= 8, operations
    return [*operations, ("GET", "/v1/no-such-endpoint")]  # 401 before routing, not 404


BAD_AUTH = {
    "missing": {},
    "wrong-token": {"Authorization": "Bearer not-the-token-at-all-000"},
    "token-prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "wrong-scheme": {"Authorization": f"Basic {TOKEN}"},
    "no-token": {"Authorization": "Bearer"},
    "bare-token": {"Authorization": TOKEN},
}


@pytest.mark.parametrize("auth", list(BAD_AUTH))
def test_every_v1_endpoint_needs_the_token(shared, auth: str) -> None:
    operations = _v1_operations(shared.url)
    with httpx.Client(base_url=shared.url, headers=BAD_AUTH[auth], timeout=10) as client:
        for method, path in operations:
            _assert_401(client.request(method, path, content=b"{}"))


def test_healthz_and_schema_document_are_open(shared) -> None:
    with httpx.Client(base_url=shared.url, timeout=10) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/openapi.json").status_code == 200


def test_correct_token_works(shared) -> None:
    with shared.client() as client:
        assert client.get("/v1/status").status_code == 200
        assert client.get("/v1/ledger").status_code == 200
        response = client.post("/v1/workers", json=registration_body(client, "token-worker"))
        assert response.status_code == 200, response.text
        response = _update(client, "token-worker")
        assert response.status_code == 200, response.text
    with CoordinatorClient(shared.url, token=TOKEN) as client:
        assert client.status().experts[PY].version >= 1
    with CoordinatorClient(shared.url, token="nope-nope-nope-nope") as client:
        with pytest.raises(ApiError) as raised:
            client.status()
        assert raised.value.status_code == 401


def test_401_comes_before_the_body_is_read(shared, raw_http) -> None:
    """A wrong token gets 401 at once, whatever the (declared) body: no 413, no 422."""
    headers = {
        "Authorization": "Bearer wrong-wrong-wrong-wrong",
        "X-FedMoE-Worker-Id": "w",
        "X-FedMoE-Update-Id": "u",
        "X-FedMoE-Base-Version": "0",
    }
    for path in (f"/v1/experts/{PY}/updates", "/v1/workers"):
        # 1 GB declared, 4 KiB sent: a server that read the body first would hang here.
        started = time.monotonic()
        status, _, body = raw_http(
            shared.url,
            "POST",
            path,
            {**headers, "Content-Length": str(10**9)},
            b"\xff" * 4096,
            timeout=5,
        )
        assert time.monotonic() - started < 3
        assert status == 401 and json.loads(body)["error"] == "unauthorized"
    garbage = bytes(range(256)) * (12 * 4096)  # 12 MiB: over the upload limit, not JSON
    with httpx.Client(base_url=shared.url, timeout=30) as client:
        started = time.monotonic()
        for path in (f"/v1/experts/{PY}/updates", "/v1/workers"):
            _assert_401(client.post(path, content=garbage, headers=headers))
        assert time.monotonic() - started < 10


# --- per-worker tokens -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def per_worker(module_coordinator_factory, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "tokens": [
                    {"token": W1_TOKEN, "role": "worker", "worker_id": "w1"},
                    {"token": W2_TOKEN, "role": "worker", "worker_id": "w2"},
                    {"sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest(), "role": "admin"},
                ]
            }
        )
    )
    live = module_coordinator_factory(tokens_file=tokens)
    with live.client(ADMIN_TOKEN) as admin:
        response = admin.post("/v1/workers", json=registration_body(admin, "w2"))  # admin: anyone
        assert response.status_code == 200, response.text
    return live


def test_worker_token_acts_only_as_its_worker(per_worker) -> None:
    with per_worker.client(W1_TOKEN) as w1:
        response = w1.post("/v1/workers", json=registration_body(w1, "w2"))
        assert response.status_code == 403
        assert response.json() == {
            "error": "forbidden",
            "detail": "this token belongs to worker 'w1', not 'w2'",
        }
        response = w1.post("/v1/workers", json=registration_body(w1, "w1"))
        assert response.status_code == 200, response.text
        version = w1.get("/v1/status").json()["experts"][PY]["version"]
        response = _update(w1, "w2", base_version=version)  # w2 is registered for PY
        assert response.status_code == 403 and "belongs to worker 'w1'" in response.text
        assert w1.get("/v1/status").json()["experts"][PY]["version"] == version
        response = _update(w1, "w1", base_version=version)
        assert response.status_code == 200, response.text
        assert response.json()["version"] == version + 1


def test_ledger_is_admin_only(per_worker) -> None:
    for token in (W1_TOKEN, W2_TOKEN):
        with per_worker.client(token) as worker:
            assert worker.get("/v1/status").status_code == 200
            response = worker.get("/v1/ledger")
            assert response.status_code == 403
            assert response.json() == {
                "error": "forbidden",
                "detail": "this endpoint needs an admin token",
            }
    with per_worker.client(ADMIN_TOKEN) as admin:
        assert admin.get("/v1/ledger").status_code == 200
    with per_worker.client("unknown-token-0123456789") as stranger:
        _assert_401(stranger.get("/v1/status"))


# --- safe defaults in the settings -----------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("AUTH_TOKEN", "TOKENS_FILE", "INSECURE", "HOST"):
        monkeypatch.delenv(f"FEDMOE_{name}", raising=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.org"])
def test_listening_beyond_loopback_without_auth_is_refused(clean_env, host: str) -> None:
    with pytest.raises(ValueError) as raised:
        CoordinatorSettings(host=host)
    message = str(raised.value)
    assert f"refusing to listen on {host} without authentication" in message
    assert "--insecure" in message and "FEDMOE_AUTH_TOKEN" in message


def test_beyond_loopback_with_auth_or_insecure_is_accepted(clean_env, tmp_path) -> None:
    assert CoordinatorSettings(host="0.0.0.0", insecure=True).host == "0.0.0.0"
    assert CoordinatorSettings(host="0.0.0.0", auth_token=TOKEN).auth_enabled
    assert CoordinatorSettings(host="0.0.0.0", tokens_file=tmp_path / "t.json").auth_enabled
    for host in ("127.0.0.1", "::1", "localhost"):
        assert CoordinatorSettings(host=host).is_loopback
    assert CoordinatorSettings().host == "127.0.0.1"  # no auth: loopback by default
    with pytest.raises(ValueError, match="at least 16 characters"):
        CoordinatorSettings(auth_token="short")


# --- TLS -------------------------------------------------------------------------------------


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost and its key, as PEM files."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:  # not a declared dependency: fall back to the openssl CLI
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"),
                *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
                *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                *("-keyout", str(key), "-out", str(cert)),
            ],
            check=True,
            capture_output=True,
        )
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(private.public_key()), False
        )
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


def test_tls_with_the_ca_cert_works_and_without_it_fails(
    live_coordinator_factory, tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("FEDMOE_CA_CERT", raising=False)
    cert, key = _self_signed_cert(tmp_path)
    live = live_coordinator_factory(auth_token=TOKEN, ssl_certfile=cert, ssl_keyfile=key)
    assert live.url.startswith("https://127.0.0.1:")
    with CoordinatorClient(live.url, token=TOKEN, ca_cert=cert) as client:
        assert client.health().status == "ok"
        assert PY in client.status().experts
    with (
        CoordinatorClient(live.url, token=TOKEN) as client,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.health()
    with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port
        httpx.get(live.url.replace("https://", "http://") + "/healthz", timeout=5)


@pytest.mark.parametrize("content", [None, b"not a certificate\n"])
def test_a_bad_ca_cert_is_named_before_any_connection(tmp_path, content, monkeypatch) -> None:
    monkeypatch.delenv("FEDMOE_CA_CERT", raising=False)
    cert = tmp_path / "ca.pem"
    if content is not None:
        cert.write_bytes(content)
    reason = "does not exist" if content is None else "could not be loaded"
    with pytest.raises(ValueError, match=f"CA certificate {cert} {reason}"):
        CoordinatorClient("https://127.0.0.1:9", ca_cert=cert)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "SELECT 1;"}\n')
    worker = ["worker", "--worker-id", "w", "--specialty", "sql_expert", "--dataset", str(data)]
    for command in (["status"], ["status", "--watch"], ["gateway"], worker):
        result = CliRunner().invoke(app, [*command, "--ca-cert", str(cert)])
        assert result.exit_code == 2, result.output
        assert reason in " ".join(result.output.split()), result.output


# --- no unpickling anywhere in the package ---------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "joblib"}
UNSAFE_CALLS = {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load")}


def unsafe_deserialisation(source: str) -> list[str]:
    """Imports of pickle-like modules and calls such as ``torch.load`` in ``source``."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> module (import torch as t)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            for alias in node.names:
                if root in UNSAFE_MODULES or (root, alias.name) in UNSAFE_CALLS:
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = aliases.get(node.value.id, node.value.id)
            if (module, node.attr) in UNSAFE_CALLS:
                found.append(f"line {node.lineno}: {module}.{node.attr}")
        elif (
            isinstance(node, ast.keyword)
            and node.arg == "allow_pickle"
            and not (isinstance(node.value, ast.Constant) and node.value.value is False)
        ):
            found.append(f"line {node.value.lineno}: allow_pickle")
    return found


def test_scanner_finds_unsafe_deserialisation() -> None:
    sample = (
        "import pickle\nimport torch as T\nfrom yaml import load\nimport numpy as np\n"
        "T.load('x')\nnp.load('y', allow_pickle=True)\n"
    )
    assert len(unsafe_deserialisation(sample)) == 4
    assert unsafe_deserialisation("import yaml\nyaml.safe_load('a: 1')\n") == []


def test_no_module_unpickles() -> None:
    files = sorted(FEDMOE_ROOT.rglob("*.py"))
    assert len(files) > 20
    problems = {
        str(path.relative_to(FEDMOE_ROOT.parent)): found
        for path in files
        if (found := unsafe_deserialisation(path.read_text()))
    }
    assert problems == {}
