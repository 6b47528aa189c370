"""Real sizes: Qwen2.5-0.5B, 1.5B and 7B-shaped adapters on a shaped 1 Gbit/s, 20 ms link.

Run: ``nice -n 10 .venv/bin/python -m benchmarks.realsize_bench [--quick]`` (``--quick``:
two syncs per size, about 9 minutes on the loaded 2-core machine of RESULTS.md, most of it
starting server processes; JSON to a temp dir unless ``--write``; the full run: longer).
It measures, per size (LoRA r=16 on q,k,v,o,gate,up,down, random values, no model:
``benchmarks._realsize_server``):

1. a worker's real background sync (``Syncer``, bf16 uploads, ``CoordinatorClient``)
   through ``benchmarks.shaped_link`` (1 Gbit/s each way, 10 ms each way), a fixed-time
   training step and a sync every 10 s: bytes per sync each way, time the training loop
   is blocked per sync and as a share of training time (``benchmarks._realsize_sync``),
   as the expert's sole worker and again with a peer uploading between its syncs;
2. the coordinator's acknowledgement latency for that size's bf16 body on loopback,
   against the FLOOR: the same bytes over the same HTTP stack and one ``fsync``;

and then, at 0.5B size, the coordinator's memory with 3 and 30 experts, and 30 workers
pushing paced updates with no lost update (``benchmarks._realsize_coordinator``); and per
size, the time to merge three experts into the gateway (``benchmarks._realsize_merge``). The
process exits 1 when an acknowledged update is missing from the ledger. The coordinator's
write path is changing (a write-ahead log, issue 13 part 3): rerun after it lands.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import _realsize_coordinator as coord
from benchmarks._harness import proc_memory, progress
from benchmarks._realsize_merge import merge_times
from benchmarks._realsize_server import RANK, SHAPES, parameters
from benchmarks._realsize_sync import Peer, sync_run
from benchmarks.common import parser, setup_torch
from benchmarks.report import publish
from benchmarks.shaped_link import GBIT, ShapedLink

RTT = 0.020  # seconds, 10 ms each way


@dataclass(frozen=True)
class Plan:
    """How long each measurement runs (the defaults: the full run)."""

    syncs: int = 6  # background syncs per size, sole worker
    peer_syncs: int = 4  # the same with a peer
    interval: float = 10.0  # seconds between syncs
    step: float = 0.5  # seconds of one fake training step
    ack_uploads: int = 24  # sequential uploads per size, coordinator and FLOOR each (the
    # FLOOR's fsync alone varies 40-85 ms for 17.6 MB here: medians of many)
    memory_experts: tuple[int, ...] = (3, 30)
    crowd_workers: int = 30
    crowd_seconds: float = 60.0
    crowd_interval: float = 10.0  # each crowd worker uploads once per this many seconds
    crowd_procs: int = 6  # load-generator processes the crowd's threads are spread over
    merge_reference: tuple[str, ...] = ("0.5B", "1.5B")  # sizes whose layer-0 svd merge is
    # also timed the textbook way (7B's full products would take minutes)


FULL = Plan()
QUICK = Plan(
    syncs=2,
    peer_syncs=1,
    ack_uploads=16,
    crowd_seconds=20.0,
    crowd_procs=3,
    merge_reference=("0.5B",),
)


def size_values(root: Path, size: str, floor: coord.Running, plan: Plan) -> dict[str, Any]:
    """Sync through the shaped link (sole worker, then with a peer), then acknowledgement
    latency, on one fresh coordinator."""
    model = SHAPES[size]
    body = coord.delta_body(size)
    # the sole worker on e1, so that it does not count as active on e0, where the peer
    # runs and the acknowledgements are timed after (judged by the screen: two workers)
    with coord.realsize_server(root / f"coordinator-{size}", size, experts=2) as server:
        port = int(server.url.rsplit(":", 1)[1])
        sync = {}
        for arm, syncs, expert in (("sole", plan.syncs, "e1"), ("peer", plan.peer_syncs, "e0")):
            progress(f"{size}: {syncs} background syncs through the shaped link ({arm})")
            peer = Peer(server.url, body, plan.interval, expert) if arm == "peer" else None
            with ShapedLink(port, rate_bytes=GBIT, one_way_delay=RTT / 2) as link:
                sync[arm] = sync_run(
                    link,
                    f"rs-{size}-{arm}",
                    syncs=syncs,
                    interval=plan.interval,
                    step=plan.step,
                    peer=peer,
                    expert=expert,
                )
        progress(f"{size}: {plan.ack_uploads} acknowledgements vs the FLOOR")
        ack = coord.ack_latency(server, floor, body, uploads=plan.ack_uploads)
        peak = proc_memory(server.pid)["VmHWM"]
    return {
        "size": size,
        "model": model.name,
        "config": asdict(model),
        "params": parameters(model),
        "float32_bytes": 4 * parameters(model),
        "bf16_body_bytes": len(body),
        "sync": sync["sole"],
        "sync_with_peer": sync["peer"],
        "ack": ack,
        "coordinator_peak_rss_mib": peak,
    }


def measure(root: Path, plan: Plan) -> dict[str, Any]:
    """Every part of the benchmark; the section's values."""
    load_before, started = list(os.getloadavg()), time.monotonic()
    with coord.realsize_server(root / "floor", floor=True) as floor:
        sizes = [size_values(root, size, floor, plan) for size in SHAPES]
    body = coord.delta_body("0.5B")
    memory = [coord.memory(root / f"memory-{n}", n, body) for n in plan.memory_experts]
    crowd = coord.crowd(
        root / "crowd",
        body,
        workers=plan.crowd_workers,
        seconds=plan.crowd_seconds,
        interval=plan.crowd_interval,
        procs=plan.crowd_procs,
    )
    merges = []
    for size in SHAPES:
        progress(f"{size}: gateway merges of three experts")
        merges.append(merge_times(size, reference=size in plan.merge_reference))
    return {
        "plan": asdict(plan),
        "rank": RANK,
        "link": {"rate_bytes": GBIT, "rtt_seconds": RTT},
        "niceness": os.nice(0),
        "cpu_count": os.cpu_count(),
        "load_before": load_before,
        "load_after": list(os.getloadavg()),
        "elapsed_seconds": time.monotonic() - started,
        "sizes": sizes,
        "memory": memory,
        "crowd": crowd,
        "merges": merges,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure, publish ``realsize``; 1 when the no-lost-update check failed."""
    args: argparse.Namespace = parser(__doc__.splitlines()[0]).parse_args(argv)
    setup_torch()
    plan = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="fedmoe-realsize-") as tmp:
        values = measure(Path(tmp), plan)
    title = "Real sizes: Qwen2.5-0.5B / 1.5B / 7B adapters on a shaped 1 Gbit/s link"
    publish("realsize", title, values, args)
    ok = bool(values["crowd"]["ok"])
    print("no lost update:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
