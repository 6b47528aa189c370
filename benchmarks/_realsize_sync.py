"""``realsize`` part 1: a worker's real background sync over a shaped 1 Gbit/s, 20 ms link.

The worker is the product's sync path without a model: ``fedmoe.worker.sync.Syncer`` in
background mode with bfloat16 uploads, talking through ``fedmoe.client.CoordinatorClient``
to a real coordinator process, over ``benchmarks.shaped_link.ShapedLink``. Its adapter is
a dict of float32 tensors of the size's exact LoRA shapes; a "training step" sleeps a fixed
time (the accelerator's share of a step) and then moves every tensor in place, so every
sync carries a real delta. Blocked time is ``WorkerStats.blocked_seconds``: what the
training thread spends in ``start`` (the snapshot) and at the step boundary that collects
the result (the rebase), i.e. everything the training loop waits for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.shaped_link import ShapedLink
from fedmoe.adapters import AdapterSchema
from fedmoe.aggregate import AdapterState
from fedmoe.client import CoordinatorClient
from fedmoe.worker.progress import WorkerStats
from fedmoe.worker.sync import Syncer, SyncIdentity, SystemClock

EXPERT = "e0"


class TensorAdapter:
    """``AdapterSlot`` over float32 tensors in memory; ``step`` moves all of them."""

    def __init__(self) -> None:
        self.tensors: AdapterState = {}

    def state(self) -> AdapterState:
        """A float32 copy (the worker's snapshot)."""
        return {key: tensor.clone() for key, tensor in self.tensors.items()}

    def load(self, state: AdapterState) -> None:
        """Overwrite the tensors with a copy of ``state``."""
        self.tensors = {key: tensor.clone() for key, tensor in state.items()}

    def step(self, amount: float) -> None:
        """The arithmetic part of a fake training step: every parameter moves."""
        for tensor in self.tensors.values():
            tensor.add_(amount)


def sync_run(
    link: ShapedLink, worker_id: str, *, syncs: int, interval: float, step: float
) -> dict[str, Any]:
    """Train with fixed-time steps until ``syncs`` background syncs are done; the figures."""
    client = CoordinatorClient(link.url, timeout=600.0)
    schema = client.schema()
    shapes: AdapterSchema = {key: tuple(shape) for key, shape in schema.tensors.items()}
    lora = schema.lora_config.model_dump()
    identity = SyncIdentity(
        worker_id, EXPERT, schema.base_model_fingerprint, lora, shapes, torch.bfloat16
    )
    stats, adapter, clock = WorkerStats(), TensorAdapter(), SystemClock()
    syncer = Syncer(
        client, adapter, identity, stats=stats, clock=clock, sync_interval=interval,
        max_backoff=5.0,
    )  # fmt: skip
    try:
        syncer.register()
        syncer.pull_and_reset()  # the worker's start-up, not a sync: its bytes are not counted
        up, down = link.bytes_up, link.bytes_down
        timings = _train(syncer, adapter, stats, syncs=syncs, step=step)
    finally:
        syncer.close()
        client.close()
    wall = time.monotonic() - stats.started
    count = max(stats.uploads, 1)
    return {
        "syncs": stats.uploads,
        "failed_syncs": stats.failed_syncs,
        "steps": stats.steps,
        "train_seconds": wall,
        "blocked_seconds_per_sync": stats.blocked_seconds / count,
        "blocked_share": stats.blocked_seconds / wall,
        "blocked_cpu_seconds_per_sync": timings.blocked_cpu / count,
        "in_flight_seconds_mean": sum(timings.flights) / max(len(timings.flights), 1),
        "in_flight_seconds_max": max(timings.flights, default=0.0),
        "payload_bytes_up_per_sync": stats.bytes_up / count,
        "payload_bytes_down_per_sync": stats.bytes_down / count,
        "wire_bytes_up_per_sync": (link.bytes_up - up) / count,
        "wire_bytes_down_per_sync": (link.bytes_down - down) / count,
        "skipped_pulls": stats.skipped_pulls,
        "full_pulls": stats.full_pulls,
        "digest_mismatches": stats.digest_mismatches,
    }


@dataclass
class Timings:
    """What the training thread saw of each sync, beside ``WorkerStats``."""

    flights: list[float] = field(default_factory=list)  # start → the collecting boundary
    blocked_cpu: float = 0.0  # the training thread's CPU seconds inside start() and collect


def _train(
    syncer: Syncer, adapter: TensorAdapter, stats: WorkerStats, *, syncs: int, step: float
) -> Timings:
    """The worker's loop: steps, a sync started when due, collected at a step boundary."""
    stats.started = time.monotonic()
    syncer.schedule_first()
    timings, began = Timings(), 0.0
    while stats.uploads < syncs or syncer.in_flight():
        time.sleep(step)  # the accelerator's share of a step: nothing for the CPU to do
        adapter.step(1e-4)
        stats.steps += 1
        stats.window_tokens += 1000
        cpu = time.thread_time()
        if syncer.in_flight():
            if syncer.poll() is not None:
                timings.flights.append(time.monotonic() - began)
                timings.blocked_cpu += time.thread_time() - cpu
        elif syncer.due() and stats.uploads < syncs:
            began = time.monotonic()
            syncer.start()
            timings.blocked_cpu += time.thread_time() - cpu
    return timings
