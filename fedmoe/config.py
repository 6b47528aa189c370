"""Configuration dataclasses shared by the coordinator and the workers.

Each field carries its help text in ``metadata["help"]`` and is validated in
``__post_init__`` with an error that names the parameter and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from peft import LoraConfig, TaskType

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """Shape and initialisation of every expert's LoRA adapter."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r of every adapted projection."})
    alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha/r."}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA input while training."}
    )
    target_modules: tuple[str, ...] = field(
        default=ALL_PROJECTIONS,
        metadata={"help": "Module names to adapt; default: all attention and MLP projections."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the shared initial adapter."})

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        modules = tuple(self.target_modules)
        if not modules or any(not isinstance(m, str) or not m for m in modules):
            raise ValueError(
                f"lora target_modules must be a non-empty list of module names, got {modules!r}"
            )
        object.__setattr__(self, "target_modules", tuple(sorted(set(modules))))

    @property
    def scaling(self) -> float:
        """The factor PEFT multiplies B·A by."""
        return self.alpha / self.rank

    def to_peft(self, *, rank: int | None = None, alpha: float | None = None) -> LoraConfig:
        """Return the PEFT ``LoraConfig`` (optionally at another rank/alpha, for merges)."""
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=rank or self.rank,
            lora_alpha=alpha or self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (what workers send when they register)."""
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraSettings:
        """Build settings from a dict such as ``to_dict`` returns; unknown keys are errors."""
        unknown = set(data) - {"rank", "alpha", "dropout", "target_modules", "seed"}
        if unknown:
            raise ValueError(f"unknown lora_config keys: {sorted(unknown)}")
        values = dict(data)
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)

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


@dataclass(frozen=True)
class TrainSettings:
    """How a worker trains its expert locally between syncs."""

    learning_rate: float | None = field(
        default=None,
        metadata={"help": "AdamW learning rate; default 1e-2 for the tiny preset, else 2e-4."},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per micro-batch."})
    max_length: int = field(default=256, metadata={"help": "Tokens per sequence (truncated)."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; 0 disables."})
    seed: int = field(default=0, metadata={"help": "Seed of data order and dropout."})

    def __post_init__(self) -> None:
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("batch_size", "max_length", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {self.max_length}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables), got {self.max_grad_norm!r}")

    def learning_rate_for(self, base_model: str) -> float:
        """The learning rate to use: the explicit one, else the preset's default."""
        if self.learning_rate is not None:
            return self.learning_rate
        return TINY_LEARNING_RATE if base_model == "tiny" else MODEL_LEARNING_RATE
