"""An httpx client for the coordinator's HTTP API v1 (used by workers and the CLI)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import httpx

from fedmoe.schemas import (
    ExpertSummary,
    ForgetReport,
    ForgetRow,
    GatewayInfo,
    Health,
    LedgerRow,
    LoraConfigBody,
    RegistrationAck,
    SchemaInfo,
    StatusInfo,
    UpdateAck,
    WorkerRegistration,
)

if TYPE_CHECKING:  # importing torch makes the CLI's `status` slow, so only for types
    from typing_extensions import Unpack

    from fedmoe.adapters import AdapterSchema
    from fedmoe.aggregate import AdapterState
    from fedmoe.deltas import ExpertChanges

TOKEN_ENV = "FEDMOE_AUTH_TOKEN"
CA_CERT_ENV = "FEDMOE_CA_CERT"


class _UploadFacts(TypedDict):
    worker_id: str
    update_id: str
    base_version: int
    num_tokens: int
    train_loss: float | None


class UploadFacts(_UploadFacts, total=False):
    """What an upload says about its delta (the ``X-FedMoE-*`` headers), as the keyword
    arguments of ``upload``; ``dp_epsilon``, the spent ε of a worker training with
    DP-SGD, and ``final``, a stopping worker's last upload, may be left out."""

    dp_epsilon: float | None
    final: bool


class ApiError(Exception):
    """The coordinator answered with an error status."""

    def __init__(self, status_code: int, code: str, detail: str) -> None:
        super().__init__(f"HTTP {status_code} {code}: {detail}")
        self.status_code, self.code, self.detail = status_code, code, detail

    @property
    def transient(self) -> bool:
        """A 5xx: the coordinator's own trouble, so the same request may succeed later."""
        return self.status_code >= 500


def tls_context(ca_cert: Path) -> ssl.SSLContext:
    """A TLS context that trusts ``ca_cert``; ``ValueError`` naming the file when it is
    missing or not a PEM bundle (rather than an OS or OpenSSL traceback)."""
    if not ca_cert.is_file():
        raise ValueError(
            f"CA certificate {ca_cert} does not exist or is not a file (--ca-cert / {CA_CERT_ENV})"
        )
    try:
        return ssl.create_default_context(cafile=str(ca_cert))
    except (ssl.SSLError, OSError) as error:
        raise ValueError(f"CA certificate {ca_cert} could not be loaded: {error}") from None


class CoordinatorClient:
    """Typed calls to one coordinator; the token defaults to ``$FEDMOE_AUTH_TOKEN``."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        ca_cert: Path | None = None,
        timeout: float = 60.0,
    ) -> None:
        token = token or os.environ.get(TOKEN_ENV) or None
        env_ca_cert = os.environ.get(CA_CERT_ENV)
        ca_cert = ca_cert or (Path(env_ca_cert) if env_ca_cert else None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=timeout,
            verify=tls_context(ca_cert) if ca_cert else True,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _api_error(response)
        return response

    def health(self) -> Health:
        """``GET /healthz``."""
        return Health.model_validate(self._call("GET", "/healthz").json())

    def status(self, *, workers_limit: int | None = None, workers_offset: int = 0) -> StatusInfo:
        """``GET /v1/status`` (one page of the workers: the server's default size if None)."""
        params: dict[str, int] = {"workers_offset": workers_offset} if workers_offset else {}
        if workers_limit is not None:
            params["workers_limit"] = workers_limit
        return StatusInfo.model_validate(self._call("GET", "/v1/status", params=params).json())

    def schema(self) -> SchemaInfo:
        """``GET /v1/schema``: base model, fingerprint, LoRA config, tensor shapes."""
        return SchemaInfo.model_validate(self._call("GET", "/v1/schema").json())

    def ledger(self, limit: int = 1000) -> list[LedgerRow]:
        """``GET /v1/ledger`` (admin): newest update records first."""
        rows = self._call("GET", "/v1/ledger", params={"limit": limit}).json()
        return [LedgerRow.model_validate(row) for row in rows]

    def forget(self, worker_id: str) -> ForgetReport:
        """``POST /v1/workers/{worker_id}/forget`` (admin): remove a worker's contribution."""
        answer = self._call("POST", f"/v1/workers/{worker_id}/forget")
        return ForgetReport.model_validate(answer.json())

    def forgets(self, limit: int = 100) -> list[ForgetRow]:
        """``GET /v1/forgets`` (admin): the experts rebuilt without a removed worker."""
        rows = self._call("GET", "/v1/forgets", params={"limit": limit}).json()
        return [ForgetRow.model_validate(row) for row in rows]

    def report_evaluation(self, report: dict[str, Any]) -> list[dict[str, Any]]:
        """``POST /v1/metrics/evaluations``: a worker's federated evaluation results."""
        return _json_rows(self._call("POST", "/v1/metrics/evaluations", json=report))

    def evaluation_history(self, **filters: Any) -> list[dict[str, Any]]:
        """``GET /v1/metrics/history`` (expert, worker_id, kind, since, until, limit)."""
        params = {key: value for key, value in filters.items() if value is not None}
        return _json_rows(self._call("GET", "/v1/metrics/history", params=params))

    def update_history(self, *, after: int = 0, limit: int = 2000) -> list[dict[str, Any]]:
        """``GET /v1/metrics/updates``: ledger rows newer than ``after``, newest first."""
        return _json_rows(
            self._call("GET", "/v1/metrics/updates", params={"after": after, "limit": limit})
        )

    def rejections(self, limit: int = 50) -> list[dict[str, Any]]:
        """``GET /v1/metrics/rejections``: the most recent refused uploads."""
        return _json_rows(self._call("GET", "/v1/metrics/rejections", params={"limit": limit}))

    def metrics_text(self) -> str:
        """``GET /metrics``: the Prometheus exposition."""
        return self._call("GET", "/metrics").text

    def register(
        self,
        *,
        worker_id: str,
        specialty: str,
        fingerprint: str,
        lora_config: LoraConfigBody | dict[str, Any],
    ) -> RegistrationAck:
        """``POST /v1/workers``."""
        body = WorkerRegistration(
            worker_id=worker_id,
            specialty=specialty,
            base_model_fingerprint=fingerprint,
            lora_config=LoraConfigBody.model_validate(lora_config),
        )
        answer = self._call("POST", "/v1/workers", json=body.model_dump(mode="json"))
        return RegistrationAck.model_validate(answer.json())

    def experts(self) -> list[ExpertSummary]:
        """``GET /v1/experts``."""
        return [ExpertSummary.model_validate(e) for e in self._call("GET", "/v1/experts").json()]

    def gateway_info(self) -> GatewayInfo:
        """``GET /v1/gateway``."""
        return GatewayInfo.model_validate(self._call("GET", "/v1/gateway").json())

    def signatures(self) -> dict[str, Any]:
        """``GET /v1/signatures``: featurizer, router settings and every expert's signature."""
        answer: dict[str, Any] = self._call("GET", "/v1/signatures").json()
        return answer

    def expert_signature(self, name: str) -> dict[str, Any]:
        """``GET /v1/experts/{name}/signature``."""
        answer: dict[str, Any] = self._call("GET", f"/v1/experts/{name}/signature").json()
        return answer

    def submit_signature(
        self, expert: str, *, worker_id: str, signature: dict[str, Any]
    ) -> dict[str, Any]:
        """``POST /v1/experts/{expert}/signature`` with an aggregate domain signature."""
        body = {"worker_id": worker_id, "signature": signature}
        path = f"/v1/experts/{expert}/signature"
        answer: dict[str, Any] = self._call("POST", path, json=body).json()
        return answer

    def download(self, path: str, etag: str | None = None) -> tuple[int, bytes | None, str]:
        """GET an adapter: (version, bytes or None when unchanged since ``etag``, etag)."""
        headers = {"If-None-Match": etag} if etag else {}
        response = self._call("GET", path, headers=headers)
        version = int(response.headers["X-FedMoE-Version"])
        body = None if response.status_code == 304 else response.content
        return version, body, response.headers.get("ETag", "")

    def expert_adapter(self, name: str, schema: AdapterSchema) -> tuple[int, AdapterState]:
        """The expert's current version and float32 tensors (validated against ``schema``)."""
        from fedmoe.adapters import decode_adapter

        version, body, _ = self.download(f"/v1/experts/{name}/adapter")
        return version, decode_adapter(body or b"", schema)

    def expert_changes(
        self,
        name: str,
        schema: AdapterSchema,
        since: int,
        exclude: str | None = None,
        *,
        wait_for: int | None = None,
        wait: float = 0.0,
    ) -> ExpertChanges:
        """``GET /v1/experts/{name}/adapter?since=V``: the steps from V, or the full expert;
        with ``wait_for``, once the expert reached that version (at most ``wait`` s later)."""
        from fedmoe.adapters import decode_adapter
        from fedmoe.deltas import ExpertChanges, decode_steps

        params: dict[str, str | int | float] = {"since": since}
        if exclude is not None:
            params["exclude"] = exclude
        if wait_for is not None and wait > 0:
            params |= {"wait_for": wait_for, "wait": wait}
        response = self._call("GET", f"/v1/experts/{name}/adapter", params=params)
        version = int(response.headers["X-FedMoE-Version"])
        digest = response.headers.get("X-FedMoE-State-Sha256")
        size = len(response.content)
        if "X-FedMoE-Delta-From" not in response.headers:
            state = decode_adapter(response.content, schema)
            return ExpertChanges(version, digest, state=state, size=size)
        target, steps = decode_steps(response.content, schema)
        if target != version:
            raise ValueError(f"steps lead to v{target}, the header says v{version}")
        delta_from = int(response.headers["X-FedMoE-Delta-From"])
        return ExpertChanges(version, digest, steps=steps, delta_from=delta_from, size=size)

    def upload(self, expert: str, body: bytes, **facts: Unpack[UploadFacts]) -> UpdateAck:
        """``POST /v1/experts/{expert}/updates`` with a safetensors delta and its facts."""
        headers = {
            "Content-Type": "application/octet-stream",
            "X-FedMoE-Worker-Id": facts["worker_id"],
            "X-FedMoE-Update-Id": facts["update_id"],
            "X-FedMoE-Base-Version": str(facts["base_version"]),
            "X-FedMoE-Num-Tokens": str(facts["num_tokens"]),
        }
        train_loss, dp_epsilon = facts["train_loss"], facts.get("dp_epsilon")
        if train_loss is not None:
            headers["X-FedMoE-Train-Loss"] = repr(float(train_loss))
        if dp_epsilon is not None:
            headers["X-FedMoE-DP-Epsilon"] = repr(float(dp_epsilon))
        if facts.get("final"):
            headers["X-FedMoE-Final"] = "true"
        answer = self._call("POST", f"/v1/experts/{expert}/updates", content=body, headers=headers)
        return UpdateAck.model_validate(answer.json())


def _api_error(response: httpx.Response) -> ApiError:
    try:
        data = response.json()
        code, detail = str(data.get("error", "error")), str(data.get("detail", data))
    except ValueError:
        code, detail = "error", response.text[:500]
    return ApiError(response.status_code, code, detail)


def _json_rows(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON list of rows the observability endpoints answer (charts read them as is)."""
    rows: list[dict[str, Any]] = response.json()
    return rows
