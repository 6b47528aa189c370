"""Asynchrony: time for the gateway to reach a target loss, FedMoE async vs synchronous rounds.

Run: ``.venv/bin/python -m benchmarks.async_bench [--quick] [--base-model tiny]``.

An event-driven simulation in ONE process with virtual clocks (``benchmarks.simulation``):
real ``LocalTrainer`` steps on the tiny model, the real ``CentralCoordinator`` for the
asynchronous arms, ``aggregate.weighted_average`` for the synchronous FedAvg arms. Three
real workers at once would contend for this machine's two cores and distort exactly the
speed differences under test; virtual clocks keep each worker's speed what we say it is.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import benchmarks.common as common
from benchmarks.report import publish
from benchmarks.simulation import Coordinator, SimWorker, Workbench, run_async, run_sync, stop_rule
from fedmoe.aggregate import AdapterState
from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.demo_data import DOMAINS

TIME_SCALE = 0.25  # --quick: 0.0625
SLOWDOWN = 4.0
SLOW_DOMAIN = "docs_expert"  # scenario A: the worker of this expert is 4x slower
FRACTIONS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@dataclass
class Trace:
    """Losses over virtual time of one arm: the gateway (cat) and each expert on its domain."""

    label: str
    times: list[float] = field(default_factory=list)
    gateway: list[dict[str, float]] = field(default_factory=list)
    experts: list[dict[str, float]] = field(default_factory=list)
    workers: list[SimWorker] = field(default_factory=list)
    seconds: float = 0.0


class Tracker:
    """Evaluates the state after every change; changes within ``window`` are evaluated once.

    The trace starts at time 0 with the base model's losses (every adapter starts with
    B = 0); a group of changes is recorded at the time of its last change.
    """

    def __init__(self, evaluator: common.Evaluator, trace: Trace, window: float) -> None:
        self.evaluator, self.trace, self.window = evaluator, trace, window
        self.first: float | None = None
        self.pending: tuple[float, list[AdapterState]] | None = None
        self.last: list[AdapterState] = []
        self.own = dict(evaluator.base)
        self._record(0.0, dict(evaluator.base))

    def __call__(self, now: float, experts: list[AdapterState]) -> None:
        """``experts`` is the state from virtual time ``now`` on."""
        if self.first is not None and now - self.first > self.window:
            self.flush()
        if self.first is None:
            self.first = now
        self.pending = (now, list(experts))

    def flush(self) -> None:
        """Evaluate the pending state (the gateway and the experts that changed)."""
        if self.pending is None:
            return
        now, experts = self.pending
        self.own = dict(self.own)
        for index, state in enumerate(experts):
            if index >= len(self.last) or self.last[index] is not state:
                domain = DOMAINS[index]
                self.own[domain] = self.evaluator.losses(state, domains=[domain])[domain]
        self.last = experts
        self._record(now, self.evaluator.gateway(experts, "cat"))
        self.first, self.pending = None, None

    def _record(self, now: float, gateway: dict[str, float]) -> None:
        self.trace.times.append(now)
        self.trace.gateway.append(gateway)
        self.trace.experts.append(self.own)


def first_time(trace: Trace, key: str, target: dict[str, float]) -> float | None:
    """The first recorded time at which every domain is at or below its target."""
    for now, losses in zip(trace.times, getattr(trace, key)):
        if all(losses[d] <= target[d] for d in DOMAINS):
            return now
    return None


def pick_target(
    base: dict[str, float], traces: list[Trace], key: str
) -> tuple[float, dict[str, float], list[float | None]]:
    """The hardest target every arm reaches: base − f·(base − best seen), f from 0.9 down."""
    best = {d: min(rec[d] for t in traces for rec in getattr(t, key)) for d in DOMAINS}
    for fraction in FRACTIONS:
        target = {d: base[d] - fraction * (base[d] - best[d]) for d in DOMAINS}
        times = [first_time(t, key, target) for t in traces]
        if all(x is not None for x in times):
            return fraction, target, times
    return 0.0, dict(base), [first_time(t, key, base) for t in traces]


class Arms:
    """Builds and runs the arms of both scenarios on one workbench."""

    def __init__(
        self, bench: Workbench, evaluator: common.Evaluator, domains: dict, cost, interval: float
    ) -> None:
        self.bench, self.evaluator, self.domains, self.cost = bench, evaluator, domains, cost
        self.interval = interval

    def workers(self, layout: list[tuple[str, float]], per_expert: int, tag: str):
        """Workers for (expert, slowdown) pairs; the i-th of an expert gets shard i."""
        seen: dict[str, int] = {}
        result = []
        for expert, slowdown in layout:
            index = seen[expert] = seen.get(expert, -1) + 1
            data = common.shard(self.domains[expert].train, per_expert, index)
            name = f"{tag}-{expert}-{index}"
            result.append(self.bench.worker(name, expert, data, slowdown=slowdown))
        return result

    def run(self, label: str, workers: list[SimWorker], horizon: float, body: Callable) -> Trace:
        """Run one arm and return its trace."""
        trace = Trace(label, workers=workers)
        tracker = Tracker(self.evaluator, trace, self.interval / 10)
        began = time.perf_counter()
        body(workers, stop_rule(horizon=horizon, budget=None), tracker)
        tracker.flush()
        trace.seconds = time.perf_counter() - began
        self.bench.occupant = None
        return trace

    def asynchronous(self, staleness: str, a: float | None = None) -> Callable:
        """An arm body: FedMoE through the real coordinator with s(τ) = ``staleness``."""

        def body(workers, finished, tracker):
            coordinator = Coordinator(self.bench, staleness=staleness, a=a)
            run_async(
                self.bench,
                coordinator,
                workers,
                sync_interval=self.interval,
                cost=self.cost,
                finished=finished,
                observe=tracker,
            )
            coordinator.close()

        return body

    def synchronous(self, steps: int) -> Callable:
        """An arm body: rounds of ``steps`` steps, FedAvg per expert after the slowest."""

        def body(workers, finished, tracker):
            run_sync(
                self.bench,
                workers,
                steps_per_round=steps,
                cost=self.cost,
                finished=finished,
                observe=tracker,
            )

        return body


def scenario(base: dict[str, float], traces: list[Trace], horizon: float) -> dict[str, Any]:
    """One scenario's figures: its targets and, per arm, times to target and final losses."""
    gf, gtarget, gtimes = pick_target(base, traces, "gateway")
    ef, etarget, etimes = pick_target(base, traces, "experts")
    reference_g, reference_e = gtimes[0], etimes[0]
    arms = []
    for trace, gt, et in zip(traces, gtimes, etimes):
        staleness = [s for w in trace.workers for s in w.staleness]
        weights = [x for w in trace.workers for x in w.weights]
        arms.append(
            {
                "label": trace.label,
                "gateway_time": gt,
                "gateway_ratio": gt / reference_g if gt and reference_g else None,
                "experts_time": et,
                "experts_ratio": et / reference_e if et and reference_e else None,
                "final_gateway": common.mean(trace.gateway[-1]),
                "best_gateway": min(common.mean(g) for g in trace.gateway),
                "final_experts": common.mean(trace.experts[-1]),
                "staleness_mean": common.mean(staleness) if staleness else None,
                "weight_mean": common.mean(weights) if weights else None,
                "steps": sum(w.steps for w in trace.workers),
                "seconds": trace.seconds,
            }
        )
    return {
        "horizon": horizon,
        "gateway_target": {"fraction": gf, "losses": gtarget},
        "experts_target": {"fraction": ef, "losses": etarget},
        "arms": arms,
    }


def main() -> None:
    """Run scenarios A and B and write the ``asynchrony`` section."""
    options = common.parser(__doc__.splitlines()[0])
    options.add_argument("--clock", choices=("calibrated", "measured"), default="calibrated")
    args, run = common.start(options)
    scale = TIME_SCALE / 4 if args.quick else TIME_SCALE
    interval = common.DEMO_SYNC_INTERVAL * scale
    # in sync intervals; a K-fast sync round lasts 4 intervals (the slow worker's time)
    horizon_a, horizon_b = (
        (5 * interval, 5 * interval) if args.quick else (13 * interval, 6 * interval)
    )
    lora, train = LoraSettings(), TrainSettings()
    bench = Workbench(args.base_model, lora, train)
    validation = 20 if args.quick else 40
    domains = common.demo_domains(bench.tokenizer, validation_count=validation)
    evaluator = common.Evaluator(args.base_model, lora, domains)
    step_time = {d: bench.calibrate(domains[d].train) for d in DOMAINS}
    fast_steps = max(1, round(interval / common.mean(step_time)))
    slow_steps = max(1, round(fast_steps / SLOWDOWN))

    def cost(worker, _result, seconds):
        return seconds if args.clock == "measured" else step_time[worker.expert]

    arms = Arms(bench, evaluator, domains, cost, interval)
    layout_a = [(d, SLOWDOWN if d == SLOW_DOMAIN else 1.0) for d in DOMAINS]
    scenario_a = [
        arms.run(
            "FedMoE async", arms.workers(layout_a, 1, "a"), horizon_a, arms.asynchronous("inverse")
        ),
        arms.run(
            f"sync, K={fast_steps} (fast worker's steps per interval)",
            arms.workers(layout_a, 1, "s"),
            horizon_a,
            arms.synchronous(fast_steps),
        ),
        arms.run(
            f"sync, K={slow_steps} (slow worker's steps per interval)",
            arms.workers(layout_a, 1, "t"),
            horizon_a,
            arms.synchronous(slow_steps),
        ),
    ]
    layout_b = [(d, s) for d in DOMAINS for s in (1.0, SLOWDOWN)]
    scenario_b = [
        arms.run(
            "async, s(τ) inverse a=0.1 (default)",
            arms.workers(layout_b, 2, "i"),
            horizon_b,
            arms.asynchronous("inverse"),
        ),
        arms.run(
            "async, s(τ) constant",
            arms.workers(layout_b, 2, "c"),
            horizon_b,
            arms.asynchronous("constant"),
        ),
        arms.run(
            "async, s(τ) polynomial a=0.5",
            arms.workers(layout_b, 2, "p"),
            horizon_b,
            arms.asynchronous("polynomial", 0.5),
        ),
        arms.run(
            f"sync FedAvg, K={fast_steps}",
            arms.workers(layout_b, 2, "f"),
            horizon_b,
            arms.synchronous(fast_steps),
        ),
    ]
    values = {
        "base_model": args.base_model,
        "lora_rank": lora.rank,
        "batch_size": train.batch_size,
        "clock": args.clock,
        "step_ms": {d: 1e3 * t for d, t in step_time.items()},
        "time_scale": scale,
        "interval": interval,
        "fast_steps": fast_steps,
        "slow_steps": slow_steps,
        "validation": validation,
        "slow_domain": SLOW_DOMAIN,
        "slowdown": SLOWDOWN,
        "domains": list(DOMAINS),
        "scenario_a": scenario(evaluator.base, scenario_a, horizon_a),
        "scenario_b": scenario(evaluator.base, scenario_b, horizon_b),
        "load_before": run.load,
        "load_after": list(os.getloadavg()),
        "wall_seconds": run.seconds(),
    }
    title = "Asynchronous vs synchronous, and the staleness function"
    publish("asynchrony", title, values, args)


if __name__ == "__main__":
    main()
