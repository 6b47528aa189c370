"""A load-generator process: N client threads pushing deltas to a coordinator (or the FLOOR).

Run as ``python -m benchmarks._load SPEC.json``; it imports only httpx (never torch)
so that many of these processes start quickly. Protocol with the parent:

1. each thread registers its worker (coordinator mode), then the process prints ``READY``;
2. it waits for a line on stdin (``GO``), pushes uploads until ``seconds`` have passed
   and each thread has made at least ``min_count`` uploads;
3. it writes its records to ``spec["out"]`` as JSON and exits.

With ``interval`` > 0 in the spec each thread uploads once per ``interval`` seconds (the
first at a random point of the first interval, so the threads are spread out) instead of
back to back.

Each upload uses ``base_version`` = the version the thread last saw (the version of its
own last acknowledgement, or the expert's version at registration), so staleness is
whatever the other clients' updates make it.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx


def _register(client: httpx.Client, worker: str, expert: str, spec: dict[str, Any]) -> int:
    body = {
        "worker_id": worker,
        "specialty": expert,
        "base_model_fingerprint": spec["fingerprint"],
        "lora_config": spec["lora_config"],
    }
    response = client.post("/v1/workers", json=body)
    response.raise_for_status()
    return int(response.json()["expert_version"])


def _upload(
    client: httpx.Client, spec: dict[str, Any], worker: str, expert: str, uid: str, base: int
) -> httpx.Response:
    if spec["mode"] == "floor":
        return client.post(
            f"/floor/{expert}", params={"write": spec.get("write", 1)}, content=spec["body"]
        )
    headers = {
        "Content-Type": "application/octet-stream",
        "X-FedMoE-Worker-Id": worker,
        "X-FedMoE-Update-Id": uid,
        "X-FedMoE-Base-Version": str(base),
        "X-FedMoE-Num-Tokens": "1000",
        "X-FedMoE-Train-Loss": "1.5",
    }
    return client.post(f"/v1/experts/{expert}/updates", content=spec["body"], headers=headers)


class Pusher(threading.Thread):
    """One client: its own connection, worker id and expert."""

    def __init__(self, spec: dict[str, Any], worker: str, expert: str) -> None:
        super().__init__(daemon=True)
        self.spec, self.worker, self.expert = spec, worker, expert
        self.client = httpx.Client(base_url=spec["url"], timeout=spec.get("timeout", 300.0))
        self.base = 0
        self.records: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.go = threading.Event()
        self.deadline = 0.0

    def prepare(self) -> None:
        """Register (coordinator mode) before the clock starts."""
        if self.spec["mode"] == "coordinator":
            self.base = _register(self.client, self.worker, self.expert, self.spec)

    def run(self) -> None:
        """Push uploads until the deadline and the minimum count are both reached."""
        self.go.wait()
        count, minimum = 0, int(self.spec.get("min_count", 0))
        interval = float(self.spec.get("interval", 0.0))
        next_at = time.perf_counter() + random.Random(self.worker).uniform(0.0, interval)
        while time.perf_counter() < self.deadline or count < minimum:
            if interval:  # paced: wait for this thread's next slot
                time.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += interval
                if time.perf_counter() >= self.deadline and count >= minimum:
                    break
            uid = f"{self.worker}-u{count}"
            start = time.perf_counter()
            try:
                response = _upload(self.client, self.spec, self.worker, self.expert, uid, self.base)
            except httpx.HTTPError as error:
                self.errors.append(f"{uid}: {type(error).__name__}: {error}")
                time.sleep(0.05)
                continue
            latency = time.perf_counter() - start
            count += 1
            if response.status_code != 200:
                self.errors.append(f"{uid}: HTTP {response.status_code} {response.text[:200]}")
                time.sleep(0.05)
                continue
            ack = response.json()
            record = {"id": uid, "expert": self.expert, "latency": latency, "end": time.time()}
            if self.spec["mode"] == "coordinator":
                self.base = int(ack["version"])
                record.update(
                    version=ack["version"], staleness=ack["staleness"], replayed=ack["replayed"]
                )
            self.records.append(record)
        self.client.close()


def main() -> None:
    """Run the protocol described in the module docstring."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    spec["body"] = Path(spec["body_file"]).read_bytes()
    pushers = [Pusher(spec, worker, expert) for worker, expert in spec["workers"]]
    for pusher in pushers:
        pusher.prepare()
        pusher.start()
    print("READY", flush=True)
    sys.stdin.readline()
    started = time.time()
    deadline = time.perf_counter() + float(spec["seconds"])
    for pusher in pushers:
        pusher.deadline = deadline
        pusher.go.set()
    for pusher in pushers:
        pusher.join()
    result = {
        "started": started,
        "finished": time.time(),
        "records": [r for p in pushers for r in p.records],
        "errors": [e for p in pushers for e in p.errors],
    }
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
