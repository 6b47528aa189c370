"""The gateway model: metadata and adapter download."""

from typing import Annotated

from fastapi import APIRouter, Header, Response
from starlette.concurrency import run_in_threadpool

from fedmoe.api.deps import CoordinatorDep, PrincipalDep
from fedmoe.api.routes.experts import SAFETENSORS, adapter_response
from fedmoe.api.schemas import GatewayInfo
from fedmoe.coordinator.signatures import router_description

router = APIRouter(prefix="/v1/gateway", tags=["gateway"])


@router.get("", response_model=GatewayInfo)
def gateway_info(coordinator: CoordinatorDep, _: PrincipalDep) -> GatewayInfo:
    """Version, merge method, expert weights and the expert versions it was built from."""
    return GatewayInfo(**coordinator.gateway_info(), router=router_description(coordinator))


@router.get("/adapter", responses={200: {"content": {SAFETENSORS: {}}}})
async def download_gateway(
    coordinator: CoordinatorDep,
    _: PrincipalDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The gateway adapter as safetensors, with ``X-FedMoE-Version`` and ``ETag``."""
    version, payload, etag = await run_in_threadpool(coordinator.gateway_payload)
    return adapter_response(version, payload, etag, if_none_match)
