"""Everything a worker is told on its command line, validated up front.

The ``fedmoe worker`` options, their help and the README's option table are generated
from these fields (``fedmoe.settings_cli``): a new field is a new flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedmoe.config import TrainSettings
from fedmoe.fields import (
    DEFAULT_COORDINATOR_URL,
    DEVICE_PATTERN,
    MAX_PULL_WAIT,
    UPLOAD_DTYPES,
    Flag,
    UploadDtype,
    WorkerId,
)

__all__ = ["UPLOAD_DTYPES", "SyncMode", "WorkerOptions", "default_pull_wait"]

SyncMode = Literal["background", "inline"]


def default_pull_wait(sync_interval: float) -> float:
    """``--pull-wait`` when not given: a fifth of the sync interval, at most the most a
    download waits (``MAX_PULL_WAIT``)."""
    return min(sync_interval / 5, MAX_PULL_WAIT)


class WorkerOptions(BaseModel):
    """One worker: which coordinator, which expert, which data, how often to sync."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    coordinator_url: str = Field(
        DEFAULT_COORDINATOR_URL,
        pattern=r"^https?://",
        description="Coordinator base URL (http:// or https://).",
    )
    worker_id: WorkerId = Field(description="Unique name of this worker.")
    specialty: str = Field(description="The expert this worker trains, e.g. python_expert.")
    dataset: Path = Field(description="Local JSONL training data.")
    eval_dataset: Path | None = Field(None, description="Validation JSONL.")
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="Held-out share of --dataset when no --eval-dataset."
    )
    sync_interval: float = Field(10.0, gt=0, description="Seconds between uploads.")
    base_model: str | None = Field(
        None, description="HF id, local path or 'tiny'; default: the coordinator's."
    )
    device: str = Field(
        "auto", pattern=DEVICE_PATTERN, description="auto, cpu, cuda, cuda:N, mps or xpu."
    )
    train: Annotated[TrainSettings, Flag(prefix="")] = Field(
        default_factory=TrainSettings, description="Local training."
    )
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: the base model in 4-bit NF4 (bitsandbytes, CUDA only; "
        "pip install 'fedmoe[qlora]'); the adapter stays float32.",
    )
    max_steps: int | None = Field(None, gt=0, description="Stop after this many steps.")
    max_seconds: float | None = Field(
        None, gt=0, description="Stop after training this many seconds."
    )
    upload_dtype: UploadDtype = Field(
        "bfloat16",
        description="dtype of uploaded deltas (the rounding is carried into the next delta).",
    )
    sync_mode: SyncMode = Field(
        "background",
        description="background: upload and pull on a thread while training goes on; "
        "inline: the training loop waits for each sync.",
    )
    align_syncs: bool = Field(
        True,
        description="Sync at the boundaries of a clock all workers share (wall-clock time "
        "in steps of --sync-interval; keep the machines' clocks in step, e.g. with NTP), so "
        "the workers of an expert upload together and each pull brings the whole round; "
        "off: every --sync-interval seconds on the worker's own clock, however long each "
        "sync takes.",
    )
    pull_wait: float | None = Field(
        None,
        ge=0,
        le=MAX_PULL_WAIT,
        description="Seconds a background sync may wait after its upload for the other "
        "active workers' updates of the round (the acknowledgement's settle_version) "
        "before it pulls, while training goes on; 0: pull at once. Default: a fifth of "
        f"--sync-interval, at most {MAX_PULL_WAIT:g}.",
    )
    auth_token: str | None = Field(None, description="Bearer token.")
    ca_cert: Path | None = Field(None, description="CA bundle to verify the coordinator's TLS.")
    signature_noise: float = Field(
        0.0, ge=0, description="Std of Gaussian noise added to the domain signature before sending."
    )
    max_backoff: float = Field(30.0, gt=0, description="Longest retry wait (s).")
    eval_every: int | None = Field(
        None,
        ge=0,
        description="Federated evaluation every N syncs (and when stopping); "
        "default: about once a minute; 0: only when stopping.",
    )
    eval_max_examples: int = Field(
        64, ge=1, description="Validation examples per federated evaluation."
    )
    slowdown: float = Field(
        1.0, ge=1.0, description="Emulate a slower machine: each step takes this many times longer."
    )
    ready_file: Path | None = Field(
        None,
        description="Write this JSON file once registered and about to train; removed on exit.",
    )

    @model_validator(mode="after")
    def _check_ignored(self) -> WorkerOptions:
        if {"eval_dataset", "validation_fraction"} <= self.model_fields_set and (
            self.eval_dataset is not None
        ):
            raise ValueError("validation_fraction has no effect when eval_dataset is given")
        train = self.train
        derived = train.dp_epsilon is not None and train.dp_noise_multiplier is None
        if derived and self.max_steps is None:
            raise ValueError(
                "dp_epsilon without dp_noise_multiplier needs max_steps: the noise is "
                "derived from the budget over the planned steps"
            )
        if self.pull_wait is not None and self.pull_wait >= self.sync_interval:
            raise ValueError(
                f"pull_wait ({self.pull_wait}) must be shorter than sync_interval "
                f"({self.sync_interval}): the next sync would wait for this one's pull"
            )
        return self

    @property
    def effective_pull_wait(self) -> float:
        """``pull_wait``, or a fifth of the sync interval when not given."""
        return default_pull_wait(self.sync_interval) if self.pull_wait is None else self.pull_wait
