"""Settings of ``fedmoe serve``: where the experts come from, how to listen, how to batch.

Validated like the coordinator's settings: exactly one source of experts, and no
listening beyond loopback without authentication unless ``insecure`` is set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from fedmoe.fields import ExistingFile
from fedmoe.listening import check_listening, default_host

AUTO_MODEL = "fedmoe-auto"
GATEWAY_MODEL = "gateway"


class ServeSettings(BaseModel):
    """Everything the serving process needs; each field is a ``fedmoe serve`` flag."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        "", description="Listen address; default 127.0.0.1, or 0.0.0.0 when auth is configured."
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    coordinator_url: str | None = Field(None, description="Load experts from this coordinator.")
    coordinator_token: SecretStr | None = Field(
        None, description="Bearer token for the coordinator (default: auth_token)."
    )
    ca_cert: Path | None = Field(None, description="CA bundle to verify the coordinator's TLS.")
    adapters_dir: Path | None = Field(
        None, description="Load experts offline from PEFT adapter directories (export-vllm's)."
    )
    base_model: str | None = Field(
        None, description="HF id, local path or 'tiny' (default: the coordinator's / adapters')."
    )
    device: str = Field("auto", description="auto|cpu|cuda|cuda:N|mps.")
    auth_token: SecretStr | None = Field(None, description="Shared bearer token clients send.")
    tokens_file: Path | None = Field(None, description="JSON tokens file (as the coordinator's).")
    insecure: bool = Field(False, description="Allow listening beyond loopback without auth.")
    ssl_certfile: ExistingFile = Field(None, description="TLS certificate.")
    ssl_keyfile: ExistingFile = Field(None, description="TLS key.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens a request may ask.")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request omits it.")
    max_batch_size: int = Field(16, ge=1, description="Most requests in one generate() call.")
    batch_wait_ms: float = Field(
        5.0, ge=0, description="How long the first request waits for others to batch with."
    )
    gateway: bool = Field(
        True,
        description="Also serve the merged gateway (from a coordinator, each new expert "
        "version then makes it rebuild the gateway when the server polls).",
    )
    router_fallback: Literal["merged", "mix"] | None = Field(
        None,
        description="fedmoe-auto without a clear winner: the merged gateway or a weighted mix "
        "of the top experts (default: the coordinator's / router.json's setting).",
    )
    reload_interval: float = Field(
        5.0, gt=0, description="Seconds between checks for new expert versions (coordinator)."
    )

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if (self.coordinator_url is None) == (self.adapters_dir is None):
            raise ValueError("give exactly one of coordinator_url and adapters_dir")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        if not self.host:
            self.host = default_host(self.auth_enabled)
        check_listening(self, exposed="use the models")
        return self

    @property
    def auth_enabled(self) -> bool:
        """Whether clients must send a bearer token."""
        return self.auth_token is not None or self.tokens_file is not None

    def coordinator_secret(self) -> str | None:
        """The token sent to the coordinator: its own, else the one clients use here."""
        token = self.coordinator_token or self.auth_token
        return token.get_secret_value() if token else None
