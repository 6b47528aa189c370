"""Everything a worker is told on its command line, validated up front."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from fedmoe.config import TrainSettings

UPLOAD_DTYPES = ("float32", "bfloat16", "float16")
WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")


@dataclass(frozen=True)
class WorkerOptions:
    """One worker: which coordinator, which expert, which data, how often to sync."""

    coordinator_url: str = field(metadata={"help": "e.g. http://127.0.0.1:5000"})
    worker_id: str = field(metadata={"help": "Unique name of this worker."})
    specialty: str = field(metadata={"help": "The expert this worker trains."})
    dataset: Path = field(metadata={"help": "Local JSONL training data."})
    eval_dataset: Path | None = field(default=None, metadata={"help": "Validation JSONL."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Held-out share of the dataset when no eval set is given."}
    )
    sync_interval: float = field(default=10.0, metadata={"help": "Seconds between uploads."})
    base_model: str | None = field(
        default=None, metadata={"help": "HF id, path or 'tiny'; default: the coordinator's."}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, mps."})
    train: TrainSettings = field(default_factory=TrainSettings)
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many steps."})
    max_seconds: float | None = field(
        default=None, metadata={"help": "Stop after training this many seconds."}
    )
    upload_dtype: str = field(default="float32", metadata={"help": "dtype of uploaded deltas."})
    auth_token: str | None = field(default=None, metadata={"help": "Bearer token."})
    ca_cert: Path | None = field(default=None, metadata={"help": "CA bundle for TLS."})
    signature_noise: float = field(
        default=0.0,
        metadata={"help": "Std of Gaussian noise added to the domain signature before sending."},
    )
    max_backoff: float = field(default=30.0, metadata={"help": "Longest retry wait (s)."})
    slowdown: float = field(
        default=1.0,
        metadata={"help": "Emulate a slower machine: each step takes this many times longer."},
    )

    def __post_init__(self) -> None:
        if not self.coordinator_url.startswith(("http://", "https://")):
            raise ValueError(
                f"coordinator_url must start with http:// or https://, got {self.coordinator_url!r}"
            )
        if not WORKER_ID.match(self.worker_id):
            raise ValueError(f"worker_id must match {WORKER_ID.pattern}, got {self.worker_id!r}")
        if self.sync_interval <= 0:
            raise ValueError(f"sync_interval must be > 0 seconds, got {self.sync_interval}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.upload_dtype not in UPLOAD_DTYPES:
            raise ValueError(
                f"upload_dtype must be one of {UPLOAD_DTYPES}, got {self.upload_dtype!r}"
            )
        if not self.signature_noise >= 0:
            raise ValueError(f"signature_noise must be >= 0, got {self.signature_noise}")
        if self.slowdown < 1.0:
            raise ValueError(f"slowdown must be >= 1.0, got {self.slowdown}")
        for name in ("max_steps", "max_seconds"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 when given, got {value}")
