"""Where the served adapters come from: a coordinator (polled by ETag) or exported directories.

A source only does I/O and validation; installing into the model is the engine's job,
so a download never blocks generation and a bad download changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig

from fedmoe.adapters import decode_adapter, read_header
from fedmoe.client import CoordinatorClient
from fedmoe.config import LoraSettings
from fedmoe.serve.models import adapter_dirs, base_model_of
from fedmoe.serve.settings import GATEWAY_MODEL

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchedAdapter:
    """A new adapter version downloaded and validated, ready to install."""

    name: str
    config: LoraConfig
    state: dict[str, torch.Tensor]
    version: int
    etag: str


class CoordinatorSource:
    """Downloads experts and the gateway from a coordinator, skipping unchanged ones (304)."""

    def __init__(self, client: CoordinatorClient, *, gateway: bool = True) -> None:
        self.client, self.gateway = client, gateway
        schema = client.schema()
        self.base_model: str = schema.base_model
        self.fingerprint: str = schema.base_model_fingerprint
        self.lora = LoraSettings.from_dict(schema.lora_config.model_dump())
        self.shapes = {key: tuple(shape) for key, shape in schema.tensors.items()}
        self._etags: dict[str, str] = {}

    def changed(self) -> list[FetchedAdapter]:
        """Every expert (and the gateway) whose ETag differs from the one last installed."""
        fetched = []
        for item in self.client.experts():
            name = item.name
            version, body, etag = self.client.download(
                f"/v1/experts/{name}/adapter", self._etags.get(name)
            )
            if body is not None:
                state = decode_adapter(body, self.shapes)
                fetched.append(FetchedAdapter(name, self.lora.to_peft(), state, version, etag))
        gateway = self._changed_gateway() if self.gateway else None
        return [*fetched, gateway] if gateway else fetched

    def _changed_gateway(self) -> FetchedAdapter | None:
        info = self.client.gateway_info()
        version, body, etag = self.client.download(
            "/v1/gateway/adapter", self._etags.get(GATEWAY_MODEL)
        )
        if body is None:
            return None
        header = read_header(body)
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        config = self.lora.to_peft(rank=info.lora_rank, alpha=info.lora_alpha)
        return FetchedAdapter(GATEWAY_MODEL, config, decode_adapter(body, shapes), version, etag)

    def installed(self, adapter: FetchedAdapter) -> None:
        """Remember ``adapter``'s ETag once it is in the model (so a failed install retries)."""
        self._etags[adapter.name] = adapter.etag


class DirectorySource:
    """PEFT adapter directories under one root (``fedmoe export-vllm`` / ``gateway --output``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.directories = adapter_dirs(self.root)
        bases = {base_model_of(path) for path in self.directories.values()}
        if len(bases) != 1:
            raise ValueError(f"{root}: adapters were written for different base models {bases}")
        self.base_model = bases.pop()
