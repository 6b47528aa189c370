"""``realsize`` part 1: a worker's real background sync over a shaped 1 Gbit/s, 20 ms link.

The worker is the product's sync path without a model: ``fedmoe.worker.sync.Syncer`` in
background mode with bfloat16 uploads, talking through ``fedmoe.client.CoordinatorClient``
to a real coordinator process, over ``benchmarks.shaped_link.ShapedLink``. Its adapter is
a ``fedmoe.worker.slots.TensorSlot``: float32 tensors of the size's exact LoRA shapes in
host memory, snapshotted into reused buffers and rebased in place as the worker's
``PeftAdapterSlot`` does (less its host-device copies on a GPU); a "training step" sleeps
a fixed time (the accelerator's share of a step) and then moves every tensor in place, so
every sync carries a real delta. Blocked time is ``WorkerStats.blocked_seconds``: what the
training thread spends in ``start`` (the snapshot) and at the step boundary that collects
the result (the rebase), i.e. everything the training loop waits for.

The worker schedules its syncs as ``fedmoe worker`` does by default: on the boundaries of
the wall clock in steps of the interval (``--align-syncs``), with a fifth of the interval
to wait for the round's other updates before it pulls (``--pull-wait``). With a ``Peer``, a
second worker uploads to the same expert (straight to the coordinator, from its own
thread) halfway between those boundaries, so the worker's update is never the only change
since its pull and it must download the peer's step: the bytes of the general case.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.shaped_link import ShapedLink
from fedmoe.adapters import AdapterSchema
from fedmoe.client import CoordinatorClient
from fedmoe.worker.options import default_pull_wait
from fedmoe.worker.progress import WorkerStats
from fedmoe.worker.slots import TensorSlot
from fedmoe.worker.sync import Syncer
from fedmoe.worker.sync_seams import SyncIdentity, SystemClock

EXPERT = "e0"


class Peer:
    """Another worker on the same expert: one bf16 upload per interval on its own thread,
    halfway between the boundaries of the wall clock the worker syncs on."""

    def __init__(self, url: str, body: bytes, interval: float, expert: str = EXPERT) -> None:
        self.client = CoordinatorClient(url, timeout=600.0)
        self.body, self.interval, self.expert = body, interval, expert
        schema = self.client.schema()
        self.version = self.client.register(
            worker_id="peer",
            specialty=expert,
            fingerprint=schema.base_model_fingerprint,
            lora_config=schema.lora_config,
        ).expert_version
        self.uploads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer", daemon=True)

    def start(self) -> None:
        """Begin uploading (the first one at the next half-way point of the wall clock)."""
        self._thread.start()

    def _run(self) -> None:
        half_way = (self.interval / 2 - time.time() % self.interval) % self.interval
        next_at = time.monotonic() + half_way
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            ack = self.client.upload(
                self.expert,
                self.body,
                worker_id="peer",
                update_id=f"peer-{self.uploads}",
                base_version=self.version,
                num_tokens=1000,
                train_loss=1.0,
            )
            self.version, self.uploads = ack.version, self.uploads + 1
            next_at += self.interval

    def close(self) -> None:
        """Stop after the upload in progress, if any."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.client.close()


def sync_run(
    link: ShapedLink,
    worker_id: str,
    *,
    syncs: int,
    interval: float,
    step: float,
    peer: Peer | None = None,
    expert: str = EXPERT,
) -> dict[str, Any]:
    """Train with fixed-time steps until ``syncs`` background syncs are done; the figures."""
    client = CoordinatorClient(link.url, timeout=600.0)
    schema = client.schema()
    shapes: AdapterSchema = {key: tuple(shape) for key, shape in schema.tensors.items()}
    lora = schema.lora_config.model_dump()
    identity = SyncIdentity(
        worker_id, expert, schema.base_model_fingerprint, lora, shapes, torch.bfloat16
    )
    stats, adapter, clock = WorkerStats(), TensorSlot(), SystemClock()
    syncer = Syncer(
        client, adapter, identity, stats=stats, clock=clock, sync_interval=interval,
        max_backoff=5.0, pull_wait=default_pull_wait(interval), round_phase=time.time,
    )  # fmt: skip
    try:
        syncer.register()
        syncer.pull_and_reset()  # the worker's start-up, not a sync: its bytes are not counted
        up, down = link.bytes_up, link.bytes_down
        if peer is not None:
            peer.start()
        timings = _train(syncer, adapter, stats, syncs=syncs, step=step)
        wall = time.monotonic() - stats.started  # before closing: that waits for the peer
    finally:
        if peer is not None:
            peer.close()
        syncer.close()
        client.close()
    count = max(stats.uploads, 1)
    return {
        "peer_uploads": 0 if peer is None else peer.uploads,
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
    syncer: Syncer, adapter: TensorSlot, stats: WorkerStats, *, syncs: int, step: float
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
