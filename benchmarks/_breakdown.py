"""Section ``coordinator-speed``, part 2: where one update's time goes, the gateway, memory.

* ``phase_breakdown``: real ``submit_update`` calls on a coordinator opened by the
  product's ``open_coordinator``, its methods wrapped by ``PhaseTimer`` (no copy of the
  update path), in a worker thread of this process (no HTTP).
* ``gateway_cost``: what the default ``cat`` gateway costs to merge, encode and write
  for a number of experts (the store's background writer does this after every update).
* ``memory_run``: peak RSS of a coordinator process holding N Qwen-shaped experts after
  a few updates to each, plus the gateway download that forces the ``cat`` merge.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks._coordinator_server import random_delta
from benchmarks._harness import percentile, proc_memory, progress, server
from fedmoe import aggregate
from fedmoe.adapters import atomic_write, encode_adapter
from fedmoe.client import CoordinatorClient
from fedmoe.config import LoraSettings
from fedmoe.coordinator.versions import UpdateRequest
from fedmoe.strategy import GatewayMerge


def tiny_initial() -> dict[str, torch.Tensor]:
    """The tiny preset's real initial adapter (rank 8)."""
    from fedmoe.modeling import initial_adapter, load_base_model

    return initial_adapter(load_base_model("tiny", device="cpu"), LoraSettings())


def _interleaved(steps: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Median seconds of each step, the steps run in turn ``repeat`` times in a worker thread.

    The coordinator runs updates in anyio worker threads (and the gateway in its writer
    thread), and torch's intra-op parallelism behaves very differently on a busy machine
    in the main thread, so the steps are timed in a worker thread too; interleaving them
    makes a burst of outside load hit every step alike.
    """

    def run() -> dict[str, float]:
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(repeat):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        return {name: statistics.median(values) for name, values in times.items()}

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


# The real update path's phases: (owner in the coordinator, method name) -> row label.
# ``_apply``'s own time (staleness weight, θ + w·Δ, Versioned view) is what is left
# of it after its timed callees; the replay and base-version checks are what is left of
# ``submit_update``.
TIMED = {
    ("coordinator", "_decode"): "decode + validate (bf16 → f32, float64 norm = NaN/Inf check)",
    (
        "coordinator",
        "_apply",
    ): "weight s(τ), apply θ + w·Δ (a new float32 expert in memory), max|θ| bound",
    (
        "coordinator",
        "_gateway_guard",
    ): "gateway overflow guard (a merge scan only near the float32 limit)",
    ("journal", "append_update"): "log record: header + body as received, write + one fsync",
    (
        "coordinator",
        "_commit",
    ): "commit: gateway version, ledger row (SQLite, no fsync of its own), state digest wait",
}
CHILDREN_OF_APPLY = ("_gateway_guard", "_commit")
CHILDREN_OF_COMMIT = ("append_update",)
TOTAL = "TOTAL submit_update"
CHECKS = "replay + base-version checks (ledger lookup)"


class PhaseTimer:
    """Wraps methods of one live coordinator (instance attributes) and sums their seconds."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def wrap(self, owner: Any, name: str) -> None:
        """Time every call of ``owner.name`` into ``self.current[name]``."""
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)

    def take(self, total: float) -> dict[str, float]:
        """This update's phases (exclusive times, seconds) and its total; then reset."""
        times = dict(self.current)
        self.current = {}
        times["_apply"] = times.get("_apply", 0.0) - sum(
            times.get(c, 0.0) for c in CHILDREN_OF_APPLY
        )
        times["_commit"] = times.get("_commit", 0.0) - sum(
            times.get(c, 0.0) for c in CHILDREN_OF_COMMIT
        )
        phases = {label: times.get(name, 0.0) for (_, name), label in TIMED.items()}
        phases[CHECKS] = total - sum(times.values())
        phases[TOTAL] = total
        return phases


def phase_breakdown(shape: str, repeat: int) -> dict[str, float]:
    """Median seconds of each phase of ``submit_update``, coordinator opened as in production."""
    from benchmarks._coordinator_server import build_coordinator

    progress(f"phase breakdown: {shape}, {repeat} updates")
    with tempfile.TemporaryDirectory(prefix="fedmoe-breakdown-") as tmp:
        coordinator = build_coordinator(shape, Path(tmp) / "state", ["e0", "e1", "e2"])
        try:
            timer = PhaseTimer()
            owners = {"coordinator": coordinator, "journal": coordinator.journal}
            for owner, name in TIMED:
                timer.wrap(owners[owner], name)
            return _timed_updates(coordinator, timer, repeat)
        finally:
            coordinator.close()


def _timed_updates(coordinator: Any, timer: PhaseTimer, repeat: int) -> dict[str, float]:
    """``repeat`` real updates in a worker thread (as the server runs them); phase medians."""
    from fedmoe.coordinator.bootstrap import register_in_process

    register_in_process(coordinator, "w", "e0")
    body = encode_adapter(random_delta(coordinator.schema), dtype=torch.bfloat16)

    def run() -> dict[str, float]:
        samples: dict[str, list[float]] = {}
        for index in range(repeat):
            version = coordinator.experts["e0"].version
            request = UpdateRequest("e0", "w", f"u{index}", version, 1, 1.0, body)
            start = time.perf_counter()
            coordinator.submit_update(request)
            for label, seconds in timer.take(time.perf_counter() - start).items():
                samples.setdefault(label, []).append(seconds)
        return {label: statistics.median(values) for label, values in samples.items()}

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


def gateway_cost(initial: dict, rank: int, experts: int, repeat: int = 2) -> dict[str, float]:
    """Seconds to merge (cat), encode and write the gateway of ``experts`` experts; its bytes."""
    progress(f"gateway cost: {experts} experts")
    states = [aggregate.apply_update(initial, initial, 0.01 * i) for i in range(experts)]
    merger = GatewayMerge(method="cat", lora=LoraSettings(rank=rank, alpha=2.0 * rank))
    weights = [1.0] * experts
    merged = merger.merge(states, weights)
    payload = encode_adapter(merged)
    with tempfile.TemporaryDirectory(prefix="fedmoe-gateway-") as tmp:
        steps = {
            "merge": lambda: merger.merge(states, weights),
            "encode": lambda: encode_adapter(merged),
            "write": lambda: atomic_write(Path(tmp) / "g.safetensors", payload),
        }
        result = _interleaved(steps, repeat)
    return {**result, "bytes": float(len(payload))}


def memory_run(
    directory: Path, experts: int, updates_each: int, merge_method: str = "cat"
) -> dict[str, Any]:
    """A Qwen-shaped coordinator process with ``experts`` experts: update, read gateway, RSS."""
    progress(f"memory: {experts} Qwen-shaped experts, gateway {merge_method}")
    with server(directory, shape="qwen", experts=experts, merge_method=merge_method) as srv:
        start_memory = proc_memory(srv.pid)
        with CoordinatorClient(srv.url, timeout=600) as client:
            schema = client.schema()
            shapes = {key: tuple(shape) for key, shape in schema.tensors.items()}
            body = encode_adapter(random_delta(shapes), dtype=torch.bfloat16)
            names = [f"e{i}" for i in range(experts)]
            versions = {}
            for name in names:
                versions[name] = client.register(
                    worker_id=f"m-{name}",
                    specialty=name,
                    fingerprint=schema.base_model_fingerprint,
                    lora_config=schema.lora_config,
                ).expert_version
            latencies = []
            for round_ in range(updates_each):
                for name in names:
                    start = time.perf_counter()
                    ack = client.upload(
                        name,
                        body,
                        worker_id=f"m-{name}",
                        update_id=f"m-{name}-{round_}",
                        base_version=versions[name],
                        num_tokens=1,
                        train_loss=1.0,
                    )
                    latencies.append(time.perf_counter() - start)
                    versions[name] = ack.version
            after_updates = proc_memory(srv.pid)
            start = time.perf_counter()
            _, gateway_bytes, _ = client.download("/v1/gateway/adapter")
            gateway_seconds = time.perf_counter() - start
            size = len(gateway_bytes or b"")
            del gateway_bytes
            rank = client.gateway_info().lora_rank
        time.sleep(1.0)
        end_memory = proc_memory(srv.pid)
    state_bytes = sum(p.stat().st_size for p in (directory / "state").rglob("*") if p.is_file())
    return {
        "experts": experts,
        "merge_method": merge_method,
        "updates": len(latencies),
        "p50_ms": 1e3 * percentile(latencies, 50),
        "p90_ms": 1e3 * percentile(latencies, 90),
        "max_ms": 1e3 * max(latencies),
        "gateway_get_ms": 1e3 * gateway_seconds,
        "gateway_bytes": size,
        "gateway_rank": rank,
        "rss_start": start_memory["VmRSS"],
        "rss_after_updates": after_updates["VmRSS"],
        "hwm_after_updates": after_updates["VmHWM"],
        "hwm": end_memory["VmHWM"],
        "state_bytes": state_bytes,
    }
