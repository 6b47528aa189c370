"""Configuration models shared by the coordinator and the workers.

Each field's ``description`` is its help text (the CLI, ``--help`` and the README's
option tables are generated from it) and is validated by pydantic, with an error that
names the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedmoe.fields import CrossEntropyKind, DpAccountant, Flag, Switch

if TYPE_CHECKING:
    from peft import LoraConfig

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSettings(BaseModel):
    """Shape and initialisation of every expert's LoRA adapter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(8, ge=1, description="LoRA rank r of every adapted projection.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input while training.")
    target_modules: tuple[str, ...] = Field(
        ALL_PROJECTIONS,
        validate_default=True,
        description="Module names to adapt; default: all attention and MLP projections.",
    )
    seed: int = Field(0, description="Seed of the shared initial adapter.")

    @field_validator("target_modules")
    @classmethod
    def _check_modules(cls, modules: tuple[str, ...]) -> tuple[str, ...]:
        if not modules or any(not m for m in modules):
            raise ValueError(
                f"lora target_modules must be a non-empty list of module names, got {modules!r}"
            )
        return tuple(sorted(set(modules)))

    @property
    def scaling(self) -> float:
        """The factor PEFT multiplies B·A by."""
        return self.alpha / self.rank

    def to_peft(self, *, rank: int | None = None, alpha: float | None = None) -> LoraConfig:
        """Return the PEFT ``LoraConfig`` (optionally at another rank/alpha, for merges)."""
        from peft import LoraConfig, TaskType  # peft loads transformers: only when needed

        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=rank or self.rank,
            lora_alpha=alpha or self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )

    def peft_dict(self) -> dict[str, Any]:
        """PEFT's own ``LoraConfig`` as a JSON-ready dict (``/v1/schema``'s ``peft_config``)."""
        from pydantic_core import to_jsonable_python

        peft = self.to_peft().to_dict() | {"target_modules": list(self.target_modules)}
        return dict(to_jsonable_python(peft))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (what workers send when they register)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraSettings:
        """Build settings from a dict such as ``to_dict`` returns; unknown keys are errors."""
        unknown = set(data) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"unknown lora_config keys: {sorted(unknown)}")
        return cls.model_validate(data)

    def differences(self, other: LoraSettings) -> list[str]:
        """List the fields that change the adapter's shape or scaling and differ."""
        names = ("rank", "alpha", "target_modules")
        return [
            f"{name}: coordinator has {getattr(self, name)!r}, worker has {getattr(other, name)!r}"
            for name in names
            if getattr(self, name) != getattr(other, name)
        ]


TINY_LEARNING_RATE = 1e-2
MODEL_LEARNING_RATE = 2e-4


class TrainSettings(BaseModel):
    """How a worker trains its expert locally between syncs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    learning_rate: Annotated[float | None, Flag(name="lr")] = Field(
        None,
        gt=0,
        description=f"AdamW learning rate; default {TINY_LEARNING_RATE:g} for the tiny preset, "
        f"else {MODEL_LEARNING_RATE:g}.",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch.")
    max_length: int = Field(256, ge=8, description="Tokens per sequence (truncated; at least 8).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables.")
    seed: int = Field(0, description="Seed of data order and dropout.")
    packing: Switch = Field(
        "auto",
        description="Padding-free packing: each micro-batch is one row, position ids restart "
        "per example and attention never crosses examples; auto: the device kind's default.",
    )
    cross_entropy: CrossEntropyKind = Field(
        "auto",
        description="Loss: 'full' logits, 'chunked' (only target rows, a chunk of logits at a "
        "time) or 'liger' (Liger Kernel's fused linear cross-entropy, extra [speed]).",
    )
    gradient_checkpointing: Switch = Field(
        "auto", description="Recompute layer activations in backward (less memory, more compute)."
    )
    torch_compile: Switch = Field(
        "auto", description="torch.compile each decoder layer (pays on GPUs after a warm-up)."
    )
    dp_epsilon: float | None = Field(
        None,
        gt=0,
        description="Example-level DP-SGD (Opacus) with this privacy budget ε: without "
        "--dp-noise-multiplier the noise is derived from it, the sample rate and --max-steps; "
        "training and uploads stop when it is spent.",
    )
    dp_delta: float | None = Field(
        None, gt=0, lt=1, description="δ of the DP guarantee; default 1/n for n training examples."
    )
    dp_noise_multiplier: float | None = Field(
        None,
        gt=0,
        description="DP-SGD with this noise multiplier σ (noise std σ·C per step); the spent ε "
        "is reported; with --dp-epsilon, a budget that stops training.",
    )
    dp_max_grad_norm: float = Field(
        1.0, gt=0, description="C: DP-SGD clips each example's gradient to this L2 norm."
    )
    dp_accountant: DpAccountant = Field(
        "rdp", description="Opacus' privacy accountant: 'rdp' (Rényi DP) or 'prv'."
    )

    @model_validator(mode="after")
    def _check_privacy(self) -> TrainSettings:
        given = self.model_fields_set
        if not self.private:
            idle = {"dp_delta", "dp_max_grad_norm", "dp_accountant"} & given
            if idle:
                raise ValueError(
                    f"{sorted(idle)} have no effect without dp_epsilon or dp_noise_multiplier"
                )
            return self
        if self.grad_accum != 1:
            raise ValueError("DP-SGD takes one Poisson batch per step: grad_accum must be 1")
        # DP-SGD has its own per-example loss and step: these switches would be ignored
        ignored = {
            name
            for name in ("packing", "gradient_checkpointing", "torch_compile")
            if getattr(self, name) == "on"
        } | ({"cross_entropy"} if self.cross_entropy in ("chunked", "liger") else set())
        if ignored:
            raise ValueError(f"{sorted(ignored)} have no effect with DP-SGD: leave them at auto")
        if "max_grad_norm" in given:
            raise ValueError(
                "max_grad_norm has no effect with DP-SGD, which clips each example's "
                "gradient to dp_max_grad_norm instead"
            )
        return self

    @property
    def private(self) -> bool:
        """Whether local training is DP-SGD."""
        return self.dp_epsilon is not None or self.dp_noise_multiplier is not None

    def learning_rate_for(self, base_model: str) -> float:
        """The learning rate to use: the explicit one, else the preset's default."""
        if self.learning_rate is not None:
            return self.learning_rate
        return TINY_LEARNING_RATE if base_model == "tiny" else MODEL_LEARNING_RATE
