"""All coordinator settings in one pydantic-settings object (flags or FEDMOE_* variables).

Validators refuse unsafe combinations, such as listening beyond loopback with
no authentication, unless the user asks for it explicitly with ``insecure``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedmoe.config import ALL_PROJECTIONS, LoraSettings
from fedmoe.coordinator.store import NAME_PATTERN
from fedmoe.routing import DEFAULT_FALLBACK, DEFAULT_MARGIN, DEFAULT_MAX_DISTANCE, FALLBACKS
from fedmoe.signature import DEFAULT_MIN_COUNT
from fedmoe.strategy import MERGE_METHODS, STALENESS_KINDS, StalenessDecay

DEFAULT_EXPERTS = ("python_expert", "sql_expert", "docs_expert")


class CoordinatorSettings(BaseSettings):
    """Everything the coordinator process needs; each field is a CLI flag too."""

    model_config = SettingsConfigDict(env_prefix="FEDMOE_", extra="forbid")

    host: str = Field(
        "",
        description="Address to listen on; default 127.0.0.1, or 0.0.0.0 when auth is configured.",
    )
    port: int = Field(5000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    base_model: str = Field("tiny", description="HF id, local path, or the 'tiny' preset.")
    experts: list[str] = Field(list(DEFAULT_EXPERTS), description="Expert (specialty) names.")
    state_dir: Path = Field(Path("fedmoe_state"), description="Ledger and adapter files.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank of every expert.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout used by workers.")
    lora_target_modules: list[str] = Field(list(ALL_PROJECTIONS), description="Adapted modules.")
    lora_seed: int = Field(0, description="Seed of the shared initial adapter.")
    server_lr: float = Field(1.0, gt=0, description="η in θ ← θ + η·s(τ)·Δ.")
    staleness: str = Field("inverse", description=f"s(τ): one of {STALENESS_KINDS}.")
    staleness_a: float | None = Field(None, ge=0, description="Parameter a of s(τ).")
    staleness_b: int | None = Field(None, ge=0, description="Parameter b of the hinge s(τ).")
    max_staleness: int | None = Field(None, ge=0, description="Refuse updates staler than this.")
    merge_method: str = Field("cat", description=f"Gateway merge: one of {MERGE_METHODS}.")
    gateway_weights: dict[str, float] = Field(
        default_factory=dict, description="Per-expert gateway weights (default uniform)."
    )
    gateway_file_interval: float = Field(
        5.0,
        ge=0,
        description="Least seconds between background writes of gateway.safetensors "
        "(0: every version); API reads always get the newest gateway.",
    )
    eager_gateway: bool = Field(
        False,
        description="Rebuild the merged gateway file after every update (default: only when "
        "the gateway is downloaded; the router serves each request from one expert).",
    )
    signature_min_count: int = Field(
        DEFAULT_MIN_COUNT, ge=1, description="Least examples behind a worker's domain signature."
    )
    router_fallback: str = Field(
        DEFAULT_FALLBACK,
        description="When no expert wins clearly: 'merged' gateway or 'mix' of the top 2.",
    )
    router_margin: float = Field(
        DEFAULT_MARGIN, ge=0, description="Lead in router score the top expert needs to answer."
    )
    router_max_distance: float = Field(
        DEFAULT_MAX_DISTANCE, gt=0, description="Distance beyond which a request falls back."
    )
    max_update_norm: float | None = Field(None, gt=0, description="Bound on an update's L2 norm.")
    norm_policy: str = Field("clip", description="Over the bound: 'clip' or 'reject'.")
    max_body_bytes: int | None = Field(
        None, gt=0, description="Upload size limit (default: 4x the float32 adapter + 64 KiB)."
    )
    auth_token: SecretStr | None = Field(None, description="Shared bearer token (admin role).")
    tokens_file: Path | None = Field(None, description="JSON file of per-worker tokens.")
    insecure: bool = Field(False, description="Allow non-loopback listening without auth.")
    ssl_certfile: Path | None = Field(None, description="TLS certificate (PEM).")
    ssl_keyfile: Path | None = Field(None, description="TLS private key (PEM).")

    @field_validator("experts")
    @classmethod
    def _check_experts(cls, experts: list[str]) -> list[str]:
        if not experts:
            raise ValueError("at least one expert name is required")
        bad = [name for name in experts if not NAME_PATTERN.match(name) or name == "gateway"]
        if bad:
            raise ValueError(f"expert names must match {NAME_PATTERN.pattern}, got {bad}")
        if len(set(experts)) != len(experts):
            raise ValueError(f"expert names must be unique, got {experts}")
        return experts

    @field_validator("auth_token")
    @classmethod
    def _check_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < 16:
            raise ValueError(
                "auth_token must be at least 16 characters; generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return token

    @field_validator("merge_method")
    @classmethod
    def _check_merge(cls, method: str) -> str:
        if method not in MERGE_METHODS:
            raise ValueError(f"merge_method must be one of {MERGE_METHODS}, got {method!r}")
        return method

    @field_validator("router_fallback")
    @classmethod
    def _check_fallback(cls, fallback: str) -> str:
        if fallback not in FALLBACKS:
            raise ValueError(f"router_fallback must be one of {FALLBACKS}, got {fallback!r}")
        return fallback

    @field_validator("norm_policy")
    @classmethod
    def _check_norm_policy(cls, policy: str) -> str:
        if policy not in ("clip", "reject"):
            raise ValueError(f"norm_policy must be 'clip' or 'reject', got {policy!r}")
        return policy

    @model_validator(mode="after")
    def _check_consistency(self) -> CoordinatorSettings:
        if not self.host:
            # With a token the seed's quick commands work across machines unchanged.
            self.host = "0.0.0.0" if self.auth_enabled else "127.0.0.1"
        self.staleness_decay()  # raises a ValueError naming the bad parameter
        unknown = sorted(set(self.gateway_weights) - set(self.experts))
        if unknown:
            raise ValueError(f"gateway_weights name unknown experts {unknown}")
        if any(w < 0 for w in self.gateway_weights.values()):
            raise ValueError("gateway_weights must be >= 0")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile must be given together")
        if not self.is_loopback and not self.auth_enabled and not self.insecure:
            raise ValueError(
                f"refusing to listen on {self.host} without authentication: anyone who can "
                "reach it could read and overwrite the experts. Set FEDMOE_AUTH_TOKEN (or "
                "--auth-token / --tokens-file), or pass --insecure if the network is trusted."
            )
        return self

    @property
    def is_loopback(self) -> bool:
        """Whether ``host`` only accepts connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def auth_enabled(self) -> bool:
        """Whether any bearer token is configured."""
        return self.auth_token is not None or self.tokens_file is not None

    def lora(self) -> LoraSettings:
        """The LoRA settings every expert shares."""
        return LoraSettings(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=tuple(self.lora_target_modules),
            seed=self.lora_seed,
        )

    def staleness_decay(self) -> StalenessDecay:
        """The configured s(τ)."""
        return StalenessDecay(kind=self.staleness, a=self.staleness_a, b=self.staleness_b)

    def expert_weights(self) -> list[float]:
        """Gateway weight of each expert, in ``experts`` order (unnamed experts get 1)."""
        return [self.gateway_weights.get(name, 1.0) for name in self.experts]
