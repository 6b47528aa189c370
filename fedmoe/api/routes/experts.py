"""Experts: list, download, and upload updates."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from fedmoe.api.body import read_upload
from fedmoe.api.deps import CoordinatorDep, PrincipalDep, ensure_may_act_as
from fedmoe.api.schemas import (
    ID_PATTERN,
    SQLITE_MAX_INT,
    DecimalInt,
    ExpertSummary,
    FiniteLoss,
    UpdateAck,
    error_responses,
)
from fedmoe.coordinator.core import CentralCoordinator
from fedmoe.coordinator.versions import MAX_DP_EPSILON, MAX_NUM_TOKENS, UpdateRequest
from fedmoe.fields import MAX_PULL_WAIT

router = APIRouter(prefix="/v1/experts", tags=["experts"])

SAFETENSORS = "application/octet-stream"
BINARY_SCHEMA = {"type": "string", "format": "binary"}
BINARY_BODY = {
    "requestBody": {"required": True, "content": {SAFETENSORS: {"schema": BINARY_SCHEMA}}}
}


class SafetensorsResponse(Response):
    """Adapter bytes (safetensors)."""

    media_type = SAFETENSORS


def adapter_responses(*errors: int, delta: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of an adapter download: binary 200, 304, and ``errors``."""
    version = {"description": "The adapter's version.", "schema": {"type": "integer"}}
    etag = {"description": "Strong validator of this version.", "schema": {"type": "string"}}
    headers = {"X-FedMoE-Version": version, "ETag": etag}
    if delta:
        headers = headers | {
            "X-FedMoE-Delta-From": {
                "description": "Present when the body holds the steps from this version "
                "(fedmoe.deltas), absent when it is the full adapter.",
                "schema": {"type": "integer"},
            },
            "X-FedMoE-State-Sha256": {
                "description": "state_digest of the expert at X-FedMoE-Version, to verify "
                "a rebuild.",
                "schema": {"type": "string"},
            },
        }
    return {
        200: {
            "description": "The adapter as safetensors.",
            "content": {SAFETENSORS: {"schema": BINARY_SCHEMA}},
            "headers": headers,
        },
        304: {"description": "Not modified (If-None-Match matched).", "headers": headers},
        **error_responses(*errors),
    }


@router.get("", response_model=list[ExpertSummary])
def list_experts(coordinator: CoordinatorDep, _: PrincipalDep) -> list[ExpertSummary]:
    """Every expert's name and version."""
    return coordinator.expert_summaries()


def etag_matches(etag: str, if_none_match: str | None) -> bool:
    """RFC 9110 If-None-Match: ``*`` or any listed tag, compared weakly (``W/`` ignored)."""
    if not if_none_match:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag.removeprefix("W/") in tags


def adapter_response(
    version: int, payload: bytes, etag: str, if_none_match: str | None
) -> Response:
    """The adapter bytes, or 304 when the client already holds this version."""
    headers = {"X-FedMoE-Version": str(version), "ETag": etag}
    if etag_matches(etag, if_none_match):
        return Response(status_code=304, headers=headers)
    return SafetensorsResponse(content=payload, headers=headers)


@router.get(
    "/{name}/adapter",
    response_class=SafetensorsResponse,
    responses=adapter_responses(404, 422, delta=True),
)
async def download_expert(
    name: str,
    coordinator: CoordinatorDep,
    _: PrincipalDep,
    if_none_match: Annotated[str | None, Header()] = None,
    since: Annotated[
        int | None,
        Query(
            ge=0,
            le=SQLITE_MAX_INT,
            description="A version the client holds: answer with the updates applied "
            "after it when that is smaller than the adapter.",
        ),
    ] = None,
    exclude: Annotated[
        str | None,
        Query(
            pattern=ID_PATTERN,
            description="With since: the caller's own update id, "
            "listed in the steps without its tensors.",
        ),
    ] = None,
    wait_for: Annotated[
        int | None,
        Query(
            ge=0,
            le=SQLITE_MAX_INT,
            description="Answer once the expert has reached this version (an upload's "
            "settle_version), or when ``wait`` runs out, whichever comes first.",
        ),
    ] = None,
    wait: Annotated[
        float,
        Query(ge=0, le=MAX_PULL_WAIT, description="Most seconds to wait for ``wait_for``."),
    ] = 0.0,
) -> Response:
    """The expert's adapter as safetensors, with ``X-FedMoE-Version`` and ``ETag``; with
    ``since``, possibly only the steps from that version (``X-FedMoE-Delta-From``); with
    ``wait_for``, once that version is reached or ``wait`` seconds have passed."""
    if wait_for is not None and wait > 0:
        await _until_version(coordinator, name, wait_for, wait)
    if since is None:
        version, payload, etag = await run_in_threadpool(coordinator.expert_payload, name)
        return adapter_response(version, payload, etag, if_none_match)
    version, payload, etag, delta_from, digest = await run_in_threadpool(
        coordinator.expert_changes, name, since, exclude
    )
    response = adapter_response(version, payload, etag, if_none_match)
    response.headers["X-FedMoE-State-Sha256"] = digest
    if delta_from is not None:
        response.headers["X-FedMoE-Delta-From"] = str(delta_from)
    return response


@router.post(
    "/{name}/updates",
    response_model=UpdateAck,
    responses=error_responses(400, 403, 404, 409, 422, 503),
    openapi_extra=BINARY_BODY,
)
async def submit_update(
    name: str,
    request: Request,
    coordinator: CoordinatorDep,
    principal: PrincipalDep,
    worker_id: Annotated[str, Header(alias="X-FedMoE-Worker-Id", pattern=ID_PATTERN)],
    base_version: Annotated[DecimalInt, Header(alias="X-FedMoE-Base-Version")],
    update_id: Annotated[str, Header(alias="X-FedMoE-Update-Id", pattern=ID_PATTERN)],
    num_tokens: Annotated[
        DecimalInt, Header(alias="X-FedMoE-Num-Tokens", ge=0, le=MAX_NUM_TOKENS)
    ] = 0,
    train_loss: Annotated[
        FiniteLoss | None,
        Header(alias="X-FedMoE-Train-Loss", description="Mean training loss (finite, >= 0)."),
    ] = None,
    dp_epsilon: Annotated[
        FiniteLoss | None,
        Header(
            alias="X-FedMoE-DP-Epsilon",
            le=MAX_DP_EPSILON,
            description="The worker's spent ε (example-level DP-SGD), recorded in the ledger.",
        ),
    ] = None,
    final: Annotated[
        bool,
        Header(
            alias="X-FedMoE-Final",
            description="The worker's last upload before it stops: from then on it no "
            "longer counts as active on the expert (K of --server-lr auto).",
        ),
    ] = False,
) -> UpdateAck:
    """Apply a delta (safetensors with the adapter's exact keys and shapes) to an expert."""
    ensure_may_act_as(principal, worker_id, name)
    # hashed and decoded as it comes: the update path waits for what is left when it must
    upload = await read_upload(request, coordinator.max_body_bytes, coordinator.schema)
    update = UpdateRequest(
        expert=name,
        worker_id=worker_id,
        update_id=update_id,
        base_version=base_version,
        num_tokens=num_tokens,
        train_loss=train_loss,
        body=upload.body,
        dp_epsilon=dp_epsilon,
        final=final,
        hashing=upload.hashing,
        decoding=upload.decoding,
    )
    return await run_in_threadpool(coordinator.submit_update, update)


async def _until_version(
    coordinator: CentralCoordinator, name: str, version: int, seconds: float
) -> None:
    """Sleep until expert ``name`` is at ``version`` or later, at most ``seconds``.

    The version is a field in memory, so polling it costs nothing; the period grows from
    5 to 50 ms so that many waiting workers cost the event loop little.
    """
    deadline, period = time.monotonic() + seconds, 0.005
    while (expert := coordinator.experts.get(name)) is not None and expert.version < version:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(period, left))
        period = min(period * 2, 0.05)
