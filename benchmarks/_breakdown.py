"""Section ``coordinator-speed``, part 2: where one update's time goes, the gateway, memory.

* ``phase_breakdown``: the steps of ``CentralCoordinator._apply`` timed one by one in
  a worker thread of this process (no HTTP), beside an in-process ``submit_update``.
* ``gateway_cost``: what the default ``cat`` gateway costs to merge, encode and write
  for a number of experts (the store's background writer does this after every update).
* ``memory_run``: peak RSS of a coordinator process holding N Qwen-shaped experts after
  a few updates to each, plus the gateway download that forces the ``cat`` merge.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks._coordinator_server import random_delta
from benchmarks._harness import ms, percentile, proc_memory, progress, server
from fedmoe import aggregate
from fedmoe.adapters import atomic_write, decode_adapter, encode_adapter, schema_of
from fedmoe.client import CoordinatorClient
from fedmoe.config import LoraSettings
from fedmoe.coordinator.core import CentralCoordinator
from fedmoe.coordinator.ledger import Ledger, UpdateRecord
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.store import AdapterStore
from fedmoe.coordinator.versions import UpdateRequest, Versioned
from fedmoe.schemas import LoraConfigBody, WorkerRegistration
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


def _coordinator(directory: Path, initial: dict, rank: int, experts: int) -> CentralCoordinator:
    directory.mkdir(parents=True, exist_ok=True)
    settings = CoordinatorSettings(
        state_dir=directory,
        experts=[f"e{i}" for i in range(experts)],
        lora_rank=rank,
        lora_alpha=2.0 * rank,
    )
    return CentralCoordinator(
        settings=settings,
        base_model="synthetic",
        fingerprint="config:synthetic/weights:synthetic",
        initial=initial,
        ledger=Ledger(directory / "ledger.sqlite3"),
        store=AdapterStore(directory, gateway_file_interval=settings.gateway_file_interval),
    )


def phase_breakdown(initial: dict, rank: int, repeat: int) -> dict[str, float]:
    """Median seconds of each step of one accepted update, and the in-process total."""
    progress(f"phase breakdown: {len(initial)} tensors")
    schema = schema_of(initial)
    body = encode_adapter(random_delta(schema), dtype=torch.bfloat16)
    decoded = decode_adapter(body, schema)
    new_state = aggregate.apply_update(initial, decoded, 0.9)
    payload = encode_adapter(new_state, {"expert": "e0", "version": "1"})
    with tempfile.TemporaryDirectory(prefix="fedmoe-breakdown-") as tmp:
        root = Path(tmp)
        ledger = Ledger(root / "ledger.sqlite3")
        ledger.add_expert("e0")
        ledger.upsert_worker("w", "e0")
        coordinator = _coordinator(root / "coord", initial, rank, 3)
        coordinator.register_worker(
            WorkerRegistration(
                worker_id="w",
                specialty="e0",
                base_model_fingerprint=coordinator.fingerprint,
                lora_config=LoraConfigBody.model_validate(coordinator.lora.to_dict()),
            )
        )
        counter = iter(range(10**9))

        def commit() -> None:
            record = UpdateRecord(
                update_id=uuid.uuid4().hex, worker_id="w", expert="e0", base_version=0,
                staleness=0, weight=1.0, update_norm=1.0, clipped=False, train_loss=1.0,
                num_tokens=1, accepted=True, expert_version=1, gateway_version=1,
            )  # fmt: skip
            record.response = record.acknowledgement()
            ledger.commit_accepted(record, {"merge_method": "cat"})

        def submit() -> None:
            version = coordinator.experts["e0"].version
            coordinator.submit_update(
                UpdateRequest("e0", "w", f"u{next(counter)}", version, 1, 1.0, body)
            )

        steps = {
            "decode + validate (bf16 → f32, isfinite)": lambda: decode_adapter(body, schema),
            "global_norm (float64)": lambda: aggregate.global_norm(decoded),
            "apply θ + w·Δ": lambda: aggregate.apply_update(initial, decoded, 0.9),
            "(not on the normal path) isfinite scan of the new state, run only when the "
            "max|θ| bound nears the float32 limit": lambda: all(
                bool(torch.isfinite(tensor).all()) for tensor in new_state.values()
            ),
            "encode expert (f32 safetensors)": lambda: encode_adapter(new_state, {"v": "1"}),
            "write expert file (fsync+rename+dir fsync)": lambda: atomic_write(
                root / "expert.safetensors", payload
            ),
            "view the bytes as tensors (Versioned.from_payload)": lambda: Versioned.from_payload(
                1, payload, abs_bound=1.0
            ),
            "ledger commit (SQLite WAL, synchronous=FULL)": commit,
            "TOTAL in-process submit_update": submit,
        }
        try:
            return _interleaved(steps, repeat)
        finally:
            coordinator.close()
            ledger.close()


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
            rank = client.gateway_info()["lora_rank"]
        time.sleep(1.0)
        end_memory = proc_memory(srv.pid)
    state_bytes = sum(p.stat().st_size for p in (directory / "state").rglob("*") if p.is_file())
    return {
        "experts": experts,
        "merge_method": merge_method,
        "updates": len(latencies),
        "p50": percentile(latencies, 50),
        "p90": percentile(latencies, 90),
        "max": max(latencies),
        "gateway_seconds": gateway_seconds,
        "gateway_bytes": size,
        "gateway_rank": rank,
        "rss_start": start_memory["VmRSS"],
        "rss_after_updates": after_updates["VmRSS"],
        "hwm_after_updates": after_updates["VmHWM"],
        "hwm": end_memory["VmHWM"],
        "rss_end": end_memory["VmRSS"],
        "state_bytes": state_bytes,
    }


def memory_table(runs: list[dict[str, Any]]) -> str:
    """The memory runs as a markdown table."""
    from benchmarks.report import markdown_table

    headers = ["experts", "gateway", "updates", "update p50 ms", "update p90 ms",
               "update max ms", "GET gateway ms", "gateway MB (rank)", "RSS idle MiB",
               "RSS after updates MiB", "peak RSS after updates MiB",
               "peak RSS incl. gateway GET MiB", "state dir MB"]  # fmt: skip
    rows = [
        [
            m["experts"],
            m["merge_method"],
            m["updates"],
            ms(m["p50"]),
            ms(m["p90"]),
            ms(m["max"]),
            ms(m["gateway_seconds"]),
            f"{m['gateway_bytes'] / 1e6:,.0f} ({m['gateway_rank']})",
            f"{m['rss_start']:,.0f}",
            f"{m['rss_after_updates']:,.0f}",
            f"{m['hwm_after_updates']:,.0f}",
            f"{m['hwm']:,.0f}",
            f"{m['state_bytes'] / 1e6:,.0f}",
        ]
        for m in runs
    ]
    return markdown_table(headers, rows)
