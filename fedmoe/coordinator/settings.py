"""All coordinator settings in one pydantic-settings object (flags or FEDMOE_* variables).

Validators refuse unsafe combinations, such as listening beyond loopback with
no authentication, unless the user asks for it explicitly with ``insecure``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fedmoe.config import LoraSettings
from fedmoe.fields import (
    DEFAULT_ROUTER_FALLBACK,
    DEFAULT_ROUTER_MARGIN,
    DEFAULT_ROUTER_MAX_DISTANCE,
    DEFAULT_ROUTER_OOD_FACTOR,
    DEFAULT_SERVER_LR,
    DEFAULT_SERVER_MOMENTUM,
    DEFAULT_SIGNATURE_MIN_COUNT,
    EXPERT_NAME,
    DeltaRetention,
    ExistingFile,
    FlatEnvSource,
    MergeMethod,
    NormPolicy,
    RobustAggregation,
    RouterFallback,
    ServerLr,
    ServerOptimizerKind,
    StalenessKind,
    StrategyKind,
    check_staleness_parameters,
    nest_flat_names,
)
from fedmoe.listening import check_listening, default_host, is_loopback

if TYPE_CHECKING:
    from fedmoe.strategy import StalenessDecay

DEFAULT_EXPERTS = ("python_expert", "sql_expert", "docs_expert")


class CoordinatorSettings(BaseSettings):
    """Everything the coordinator process needs; each field is a CLI flag too.

    The ``fedmoe coordinator`` options, their help and the README's option table are
    generated from these fields (``fedmoe.settings_cli``): a new field is a new flag.
    """

    model_config = SettingsConfigDict(env_prefix="FEDMOE_", extra="forbid")

    host: str = Field(
        "",
        description="Address to listen on; default 127.0.0.1, or 0.0.0.0 when auth is configured.",
    )
    port: int = Field(5000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    base_model: str = Field("tiny", description="HF id, local path, or the 'tiny' preset.")
    experts: list[str] = Field(list(DEFAULT_EXPERTS), description="Expert (specialty) names.")
    state_dir: Path = Field(Path("fedmoe_state"), description="Ledger and adapter files.")
    cache_dir: Path = Field(
        Path("~/.cache/fedmoe"),
        description="Shared cache of base-model facts (initial adapter, fingerprint) for the "
        "tiny preset and local model directories, so a new state dir skips loading the model.",
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="The LoRA adapter every expert shares."
    )
    server_lr: ServerLr = Field(
        "auto",
        description="η in θ ← θ + η·s(τ)·Δ (> 0), or 'auto': 1/K for K workers active on "
        "the expert, 1 for a lone worker; 'mean': 1/(K·s(K−1)) (at most 1), so an update "
        "at the typical staleness K−1 moves the expert by 1/K of its delta; 'agree': 1/K + "
        "(1 − 1/K)·c for the mean pairwise cosine c of the expert's recent deltas ('mean' "
        "and 'agree': 'async' only; default 0.7 with --server-optimizer nesterov, 0.01 "
        "with adam).",
    )
    strategy: StrategyKind = Field(
        "async",
        description="Server aggregation: 'async' applies each update at once, 'fedbuff' "
        "applies the mean of --buffer-size buffered updates.",
    )
    buffer_size: int = Field(2, ge=1, description="K: updates a 'fedbuff' buffer holds.")
    buffer_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds after which a partly filled 'fedbuff' buffer is applied.",
    )
    server_optimizer: ServerOptimizerKind = Field(
        "sgd",
        description="Optimizer over the aggregated delta: 'sgd', 'nesterov' (DiLoCo's outer "
        "step) or 'adam' (FedAdam).",
    )
    server_momentum: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Momentum (β1 for adam); default 0 for sgd, 0.9 for nesterov and adam.",
    )
    server_eps: float = Field(1e-3, gt=0, description="ε of the 'adam' server optimizer.")
    robust_aggregation: RobustAggregation = Field(
        "none",
        description="How a 'fedbuff' buffer is combined: 'none' (its mean), 'median' "
        "(coordinate-wise) or 'trimmed_mean' (see --trim-fraction).",
    )
    trim_fraction: float = Field(
        0.25,
        ge=0,
        lt=0.5,
        description="Share of a buffer's updates dropped at each end of every coordinate by "
        "--robust-aggregation trimmed_mean.",
    )
    outlier_test: bool = Field(
        False,
        description="Reject a buffered update whose norm is over --outlier-norm-factor x the "
        "buffer's median norm, or whose cosine to the buffer's coordinate-wise median is < 0.",
    )
    outlier_norm_factor: float = Field(
        3.0, gt=1, description="k of --outlier-test's norm bound (k x the median norm)."
    )
    screen_updates: bool = Field(
        True,
        description="'async': judge each update against the expert's recent ones and reject "
        "(weight 0, reason in the ledger) one whose norm is over --screen-norm-factor x the "
        "median of the other workers' latest norms or whose cosine to the accepted updates' "
        "average direction is below --screen-min-cosine; a lone worker is never judged.",
    )
    screen_norm_factor: float = Field(
        3.0, gt=1, description="k of the update screen's norm bound (k x the others' median)."
    )
    screen_min_cosine: float = Field(
        0.0,
        ge=-1,
        lt=1,
        description="Least cosine of an update to the recent accepted direction.",
    )
    screen_history: int = Field(
        16,
        ge=2,
        le=10000,
        description="Workers whose latest norm the screen remembers; the direction average "
        "decays over about as many accepted updates.",
    )
    screen_min_workers: int = Field(
        2,
        ge=1,
        le=9999,
        description="Workers other than the sender the history must hold before the screen "
        "judges (until then: accepted).",
    )
    fedavg_rounds: bool = Field(
        True,
        description="'async' without a server optimizer: the update that completes a round "
        "(every active worker's update made from one version, nothing else applied since) "
        "makes the expert anew from that version, the round's deltas weighted by token "
        "count (X-FedMoE-Num-Tokens) x s(τ)·clip and sharing the total weight they were "
        "applied with: equally fast workers end each round as a synchronous FedAvg round.",
    )
    token_weighting: bool = Field(
        False,
        description="Weight each update by its token count (X-FedMoE-Num-Tokens) relative "
        "to the expert's recent mean.",
    )
    activity_window: float = Field(
        600.0,
        gt=0,
        description="Seconds within which a worker registered or uploaded counts as active "
        "on its expert (--server-lr auto, --staleness-grace, token means).",
    )
    staleness: StalenessKind = Field("inverse", description="The staleness decay s(τ).")
    staleness_grace: bool = Field(
        True,
        description="Count an update's staleness τ only beyond the K−1 updates the other "
        "active workers of its expert make in one sync interval: s(max(0, τ − (K−1))), so "
        "equally fast workers' updates all count in full and only a lagging worker's decay.",
    )
    staleness_a: float | None = Field(
        None, ge=0, description="Parameter a of s(τ) (not for 'constant')."
    )
    staleness_b: int | None = Field(None, ge=0, description="Parameter b of the 'hinge' s(τ).")
    max_staleness: int | None = Field(
        None, ge=0, description="Refuse updates staler than this (409)."
    )
    merge_method: MergeMethod = Field("cat", description="How experts merge into the gateway.")
    gateway_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Per-expert gateway weights, e.g. python_expert=2,sql_expert=1 "
        "(default uniform).",
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
    snapshot_every_updates: int = Field(
        100,
        ge=1,
        le=10**9,
        description="Write an expert's full snapshot (in the background) after this many "
        "logged updates; an update itself is durable by its log record.",
    )
    snapshot_every_seconds: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="...or this many seconds after its first update not yet in a snapshot.",
    )
    delta_retention: DeltaRetention = Field(
        "keep",
        description="Log segments a snapshot covers: 'keep' moves them to wal/<expert>/"
        "archive (every accepted delta stays readable), 'drop' deletes them.",
    )
    signature_min_count: int = Field(
        DEFAULT_SIGNATURE_MIN_COUNT,
        ge=1,
        description="Least examples behind a worker's domain signature.",
    )
    router_fallback: RouterFallback = Field(
        DEFAULT_ROUTER_FALLBACK,
        description="When no expert wins clearly: 'merged' gateway or 'mix' of the top 2.",
    )
    router_margin: float = Field(
        DEFAULT_ROUTER_MARGIN,
        ge=0,
        description="Lead in router score the top expert needs to answer.",
    )
    router_max_distance: float = Field(
        DEFAULT_ROUTER_MAX_DISTANCE, gt=0, description="Distance beyond which a request falls back."
    )
    router_ood_factor: float = Field(
        DEFAULT_ROUTER_OOD_FACTOR,
        ge=0,
        le=1000,
        description="A request falls back when its subspace distance to the top expert exceeds "
        "this times that domain's own 99th percentile (0: off; format 1 signatures: no test).",
    )
    max_update_norm: float | None = Field(None, gt=0, description="Bound on an update's L2 norm.")
    norm_policy: NormPolicy = Field(
        "clip", description="What happens to an update over --max-update-norm."
    )
    max_body_bytes: int | None = Field(
        None, gt=0, description="Upload size limit (default: 4x the float32 adapter + 64 KiB)."
    )
    max_registration_bytes: int = Field(
        16384,
        ge=1024,
        description="Body limit of a registration and of any request other than an upload.",
    )
    max_workers: int = Field(
        10000, ge=1, description="Most registered workers; a new worker past it gets 429."
    )
    worker_ttl: float = Field(
        7 * 24 * 3600.0,
        ge=0,
        description="Forget workers not seen for this many seconds (0: never); they re-register.",
    )
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a client has to send a request's headers."
    )
    body_timeout: float = Field(
        30.0, gt=0, description="Most seconds between two pieces of a request body (then 408)."
    )
    auth_token: SecretStr | None = Field(None, description="Shared bearer token (admin role).")
    tokens_file: Path | None = Field(None, description="JSON file of per-worker tokens.")
    insecure: bool = Field(False, description="Allow non-loopback listening without auth.")
    ssl_certfile: ExistingFile = Field(None, description="TLS certificate (PEM).")
    ssl_keyfile: ExistingFile = Field(None, description="TLS private key (PEM).")
    metrics_loopback_open: bool = Field(
        False,
        description="Serve /metrics without a token to clients on loopback (a local "
        "Prometheus); everyone else still needs a token.",
    )
    url_file: Path | None = Field(
        None,
        description="Write {url, pid} as JSON here once the port is bound (port 0: the port "
        "it got); removed on exit.",
    )

    @field_validator("experts")
    @classmethod
    def _check_experts(cls, experts: list[str]) -> list[str]:
        if not experts:
            raise ValueError("at least one expert name is required")
        bad = [name for name in experts if not EXPERT_NAME.match(name) or name == "gateway"]
        if bad:
            raise ValueError(f"expert names must match {EXPERT_NAME.pattern}, got {bad}")
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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then ``FEDMOE_<FLAG>`` variables read as the flags are."""
        return (init_settings, FlatEnvSource(settings_cls, os.environ), file_secret_settings)

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_names(cls, data: Any) -> Any:
        """Accept ``lora_rank=8`` (the flag's and the variable's name) for ``lora.rank``."""
        return nest_flat_names(cls, data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check_consistency(self) -> CoordinatorSettings:
        if not self.host:
            self.host = default_host(self.auth_enabled)
        check_staleness_parameters(
            self.staleness, self.staleness_a, self.staleness_b, label="staleness_"
        )
        self._check_strategy()
        if "norm_policy" in self.model_fields_set and self.max_update_norm is None:
            raise ValueError("norm_policy has no effect without max_update_norm")
        unknown = sorted(set(self.gateway_weights) - set(self.experts))
        if unknown:
            raise ValueError(f"gateway_weights name unknown experts {unknown}")
        if any(w < 0 for w in self.gateway_weights.values()):
            raise ValueError("gateway_weights must be >= 0")
        check_listening(self, exposed="read and overwrite the experts")
        return self

    def _check_strategy(self) -> None:
        if isinstance(self.server_lr, float) and not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0 or a rule's name, got {self.server_lr}")
        if self.server_lr in ("mean", "agree") and self.strategy != "async":
            raise ValueError(f"server_lr {self.server_lr!r} is for strategy 'async' only")
        if self.server_optimizer == "nesterov" and self.server_momentum == 0:
            raise ValueError("server_optimizer 'nesterov' needs server_momentum > 0")
        explicit = "fedavg_rounds" in self.model_fields_set
        if explicit and self.fedavg_rounds and not self.rounds_apply:
            raise ValueError(
                "fedavg_rounds needs strategy 'async' and server_optimizer 'sgd' without "
                "momentum (it shares out applied weights; a buffer or optimizer state does "
                "not step by them): set fedavg_rounds false"
            )
        fedbuff_only = {"buffer_size", "buffer_timeout"} & self.model_fields_set
        if fedbuff_only and self.strategy != "fedbuff":
            raise ValueError(f"{sorted(fedbuff_only)} have no effect without strategy 'fedbuff'")
        robust = {"robust_aggregation", "trim_fraction", "outlier_test", "outlier_norm_factor"}
        robust &= self.model_fields_set
        if robust and self.strategy != "fedbuff":
            raise ValueError(f"{sorted(robust)} have no effect without strategy 'fedbuff'")
        if "trim_fraction" in robust and self.robust_aggregation != "trimmed_mean":
            raise ValueError(
                "trim_fraction has no effect without robust_aggregation 'trimmed_mean'"
            )
        if "outlier_norm_factor" in robust and not self.outlier_test:
            raise ValueError("outlier_norm_factor has no effect without outlier_test")
        self._check_screen()

    def _check_screen(self) -> None:
        tuning = {n for n in self.model_fields_set if n.startswith("screen_")} - {"screen_updates"}
        if tuning and not self.screen_updates:
            raise ValueError(f"{sorted(tuning)} have no effect without screen_updates")
        if tuning and self.strategy != "async":
            raise ValueError(f"{sorted(tuning)} have no effect without strategy 'async'")
        if self.screen_min_workers >= self.screen_history:
            raise ValueError("screen_min_workers must be less than screen_history")

    @property
    def effective_server_lr(self) -> ServerLr:
        """η: as given, else the server optimizer's default (auto, 0.7 nesterov, 0.01 adam)."""
        if "server_lr" in self.model_fields_set:
            return self.server_lr
        return DEFAULT_SERVER_LR[self.server_optimizer]

    @property
    def rounds_apply(self) -> bool:
        """Whether --fedavg-rounds takes effect: 'async' with the plain rule (no server
        optimizer state), where every update moves the expert by weight·Δ."""
        plain = self.server_optimizer == "sgd" and self.effective_server_momentum == 0
        return self.fedavg_rounds and self.strategy == "async" and plain

    @property
    def effective_server_momentum(self) -> float:
        """Momentum: as given, else the server optimizer's default."""
        if self.server_momentum is not None:
            return self.server_momentum
        return DEFAULT_SERVER_MOMENTUM[self.server_optimizer]

    @property
    def is_loopback(self) -> bool:
        """Whether ``host`` only accepts connections from this machine."""
        return is_loopback(self.host)

    @property
    def auth_enabled(self) -> bool:
        """Whether any bearer token is configured."""
        return self.auth_token is not None or self.tokens_file is not None

    def staleness_decay(self) -> StalenessDecay:
        """The configured s(τ)."""
        from fedmoe.strategy import StalenessDecay  # torch: not needed to read settings

        return StalenessDecay(kind=self.staleness, a=self.staleness_a, b=self.staleness_b)

    def expert_weights(self) -> list[float]:
        """Gateway weight of each expert, in ``experts`` order (unnamed experts get 1)."""
        return [self.gateway_weights.get(name, 1.0) for name in self.experts]
