"""Sync cost at a real size: time the training loop is blocked per sync, and bytes moved.

Run: ``.venv/bin/python -m benchmarks.sync_bench [--quick]``.

A real coordinator subprocess (``benchmarks._coordinator_server --shape qwen``: a synthetic
adapter shaped like Qwen2.5-0.5B's with LoRA r=16 on all seven projections, ≈ 8.8 M
parameters, 35 MB float32) on loopback, and in this process the worker's real ``Syncer``
and ``CoordinatorClient`` over an in-memory adapter of the same shape (random values; no
model). A "training step" sleeps a fixed time and then moves every tensor (an in-place
add), so each sync has a real delta. Arms, one after the other on the same coordinator:

* ``before``: what a worker did before issue 13: inline sync, float32 upload, and a full
  download of the expert after every upload (the acknowledgement's digest is ignored);
* ``inline-bf16``: inline, bfloat16 upload, the new expert rebuilt from the acknowledgement;
* ``background-bf16``: the same on the background thread (the default).

Blocked time is ``WorkerStats.blocked_seconds`` (capture, rebase and, inline, all network
work) per sync. The link is loopback, not a shaped 1 Gbit/s link.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks._coordinator_server import QWEN_FINGERPRINT
from benchmarks._harness import server
from benchmarks.common import parser, setup_torch
from benchmarks.report import publish
from fedmoe.adapters import AdapterSchema
from fedmoe.aggregate import AdapterState
from fedmoe.client import CoordinatorClient
from fedmoe.schemas import UpdateAck
from fedmoe.worker.progress import WorkerStats
from fedmoe.worker.sync import Syncer
from fedmoe.worker.sync_seams import SyncIdentity, SystemClock

EXPERT = "e0"


class TensorAdapter:
    """``AdapterSlot`` over a dict of float32 tensors; ``step`` moves all of them."""

    def __init__(self) -> None:
        self.tensors: AdapterState = {}

    def state(self) -> AdapterState:
        """A copy (the worker's snapshot)."""
        return {key: t.clone() for key, t in self.tensors.items()}

    def load(self, state: AdapterState) -> None:
        """Overwrite the tensors."""
        self.tensors = {key: t.clone() for key, t in state.items()}

    def step(self, amount: float) -> None:
        """The arithmetic part of a fake training step."""
        for tensor in self.tensors.values():
            tensor.add_(amount)


class NoDigestClient(CoordinatorClient):
    """The client as a worker before issue 13 used it: every new expert is downloaded."""

    def upload(self, expert: str, body: bytes, **kwargs: Any) -> UpdateAck:
        """Upload, then forget the digest so that the worker pulls."""
        ack = super().upload(expert, body, **kwargs)
        return ack.model_copy(update={"state_sha256": None})


@dataclass(frozen=True)
class Arm:
    """One way of syncing."""

    name: str
    background: bool
    dtype: torch.dtype
    digest: bool


ARMS = (
    Arm("before", background=False, dtype=torch.float32, digest=False),
    Arm("inline-bf16", background=False, dtype=torch.bfloat16, digest=True),
    Arm("background-bf16", background=True, dtype=torch.bfloat16, digest=True),
)


def run_arm(url: str, arm: Arm, *, syncs: int, interval: float, step: float) -> dict[str, Any]:
    """Train with fake steps for ``syncs`` sync intervals; the arm's figures."""
    client = (CoordinatorClient if arm.digest else NoDigestClient)(url)
    schema = client.schema()
    shapes: AdapterSchema = {key: tuple(shape) for key, shape in schema.tensors.items()}
    lora = schema.lora_config.model_dump()
    identity = SyncIdentity(f"bench-{arm.name}", EXPERT, QWEN_FINGERPRINT, lora, shapes, arm.dtype)
    stats, adapter = WorkerStats(), TensorAdapter()
    syncer = Syncer(
        client, adapter, identity, stats=stats, clock=SystemClock(), sync_interval=interval,
        max_backoff=5.0,
    )  # fmt: skip
    syncer.register()
    syncer.pull_and_reset()
    stats.started = time.monotonic()
    syncer.schedule_first()
    while stats.uploads < syncs:
        threading.Event().wait(step)  # the GPU's share of a step: nothing for the CPU to do
        adapter.step(1e-4)
        stats.steps += 1
        stats.window_tokens += 1000
        if syncer.in_flight():
            syncer.poll()
        elif syncer.due():
            syncer.start() if arm.background else syncer.sync()
    wall = time.monotonic() - stats.started
    syncer.close()
    client.close()
    return {
        "arm": arm.name,
        "background": arm.background,
        "upload_dtype": str(arm.dtype).removeprefix("torch."),
        "syncs": stats.uploads,
        "failed_syncs": stats.failed_syncs,
        "steps": stats.steps,
        "train_seconds": wall,
        "blocked_seconds_per_sync": stats.blocked_seconds / stats.uploads,
        "blocked_share": stats.blocked_seconds / wall,
        "bytes_up_per_sync": stats.bytes_up / stats.uploads,
        "bytes_down_per_sync": stats.bytes_down / stats.uploads,
        "skipped_pulls": stats.skipped_pulls,
        "full_pulls": stats.full_pulls,
    }


def main(argv: list[str] | None = None) -> int:
    """Run every arm against one Qwen-shaped coordinator and publish ``sync``."""
    args: argparse.Namespace = parser(__doc__.splitlines()[0]).parse_args(argv)
    setup_torch()
    syncs, interval, step = (4, 1.0, 0.05) if args.quick else (10, 2.0, 0.05)
    with tempfile.TemporaryDirectory(prefix="fedmoe-sync-bench-") as tmp:
        with_server = server(Path(tmp) / "coordinator", shape="qwen", experts=1)
        with with_server as coordinator:
            rows = [
                run_arm(coordinator.url, arm, syncs=syncs, interval=interval, step=step)
                for arm in ARMS
            ]
    values = {"sync_interval": interval, "step_seconds": step, "arms": rows}
    publish("sync", "Sync cost at Qwen2.5-0.5B size (inline vs background)", values, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
