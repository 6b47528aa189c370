"""Adapter files in the state directory: expert snapshots and the gateway.

Files are written by temp-file, fsync and rename. The ledger's ``snapshots`` table says
which version of an expert is its current snapshot (``fedmoe.coordinator.journal``);
files of other versions are leftovers and are removed.
The gateway is a pure function of the experts, so its file is written in the
background and recomputed at start-up rather than trusted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from fedmoe.adapters import atomic_write, encode_adapter, prune_versions

logger = logging.getLogger(__name__)


class GatewaySource(Protocol):
    """Anything that can produce the gateway's safetensors bytes (``LazyGateway``)."""

    version: int

    def encoded(self) -> bytes:
        """The gateway adapter as safetensors bytes."""


class AdapterStore:
    """Versioned adapter files under ``<state_dir>/adapters``."""

    def __init__(self, state_dir: Path, *, gateway_file_interval: float = 0.0) -> None:
        self.directory = Path(state_dir) / "adapters"
        # The gateway file is for operators (the API merges on demand and a restart rebuilds
        # it), so under a stream of updates it need not be rewritten for every version:
        # with many large experts one rewrite can take seconds of a CPU core.
        self.gateway_file_interval = gateway_file_interval
        self.directory.mkdir(parents=True, exist_ok=True)
        self._gateway_pending: GatewaySource | None = None
        self._gateway_latest: GatewaySource | None = None  # queued or written last
        self._gateway_event = threading.Condition()
        self._closed = False
        self._writer = threading.Thread(
            target=self._gateway_loop, name="gateway-writer", daemon=True
        )
        self._writer.start()

    def expert_path(self, name: str, version: int) -> Path:
        """Where version ``version`` of expert ``name`` lives."""
        return self.directory / f"{name}.v{version:010d}.safetensors"

    def save_expert(self, name: str, version: int, state: Mapping[str, torch.Tensor]) -> bytes:
        """Durably write one expert version (before the ledger says it exists); its bytes."""
        payload = encode_adapter(state, {"name": name, "version": str(version)})
        atomic_write(self.expert_path(name, version), payload)
        return payload

    def save_payload(self, name: str, version: int, payload: bytes) -> None:
        """Durably write an expert version's float32 safetensors bytes (a snapshot)."""
        atomic_write(self.expert_path(name, version), payload)

    def read_expert(self, name: str, version: int) -> bytes:
        """The safetensors bytes of one expert version (our own file, never unpickled)."""
        path = self.expert_path(name, version)
        if not path.exists():
            raise FileNotFoundError("the file is missing")
        return path.read_bytes()

    def prune_expert(self, name: str, keep_version: int) -> None:
        """Remove every file of ``name`` except the current version (and its temp files)."""
        prune_versions(self.directory, name, "v", self.expert_path(name, keep_version))

    @property
    def gateway_path(self) -> Path:
        """The gateway's latest saved adapter file."""
        return self.directory / "gateway.safetensors"

    def save_gateway_later(self, gateway: GatewaySource) -> None:
        """Queue the gateway for writing; only the newest queued version is written."""
        with self._gateway_event:
            if gateway is self._gateway_latest:
                return  # every download of one version asks; it is written once
            self._gateway_latest = gateway
            self._gateway_pending = gateway
            self._gateway_event.notify()

    def _gateway_loop(self) -> None:
        while True:
            with self._gateway_event:
                while self._gateway_pending is None and not self._closed:
                    self._gateway_event.wait()
                if self._gateway_pending is None:
                    return
                gateway = self._gateway_pending
                self._gateway_pending = None
            try:
                atomic_write(self.gateway_path, gateway.encoded())
            except OSError:
                logger.exception("could not write the gateway file")
            if self.gateway_file_interval > 0:
                with self._gateway_event:  # close() cuts the pause short
                    self._gateway_event.wait_for(lambda: self._closed, self.gateway_file_interval)

    def close(self) -> None:
        """Write any queued gateway and stop the writer thread."""
        with self._gateway_event:
            self._closed = True
            self._gateway_event.notify()
        self._writer.join(timeout=30)
