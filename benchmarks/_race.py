"""The race of ``benchmarks.strategy_bench``: one worker in four 4x slower, time to a target.

4 workers per expert on IID shards, the last of each expert 4x slower. Virtual time is
counted in steps of a full-speed worker; a sync interval is ``interval`` of them.
Synchronous FedAvg rounds (``interval`` steps each, waiting for the slow worker) run
for ``rounds`` rounds; that horizon is every arm's. The target on each domain is 90%
of the improvement synchronous FedAvg makes by the horizon:
``base − 0.9·(base − final)``. Every ``interval`` of virtual time the experts as they
were then are evaluated on their own domain; an arm's time is the first such time at
which every domain is at or below its target. Asynchronous arms stop there.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.common import Evaluator, mean
from benchmarks.simulation import Coordinator, run_async, run_sync, worker_side
from fedmoe.aggregate import AdapterState
from fedmoe.demo_data import DOMAINS

if TYPE_CHECKING:
    from benchmarks.strategy_bench import Matrix

PER_EXPERT = 4
SLOWDOWN = 4.0
FRACTION = 0.9


class Trace:
    """Own-domain losses of the experts on a grid of virtual times, evaluated as they pass."""

    def __init__(self, evaluator: Evaluator, grid: float, target: dict[str, float] | None) -> None:
        self.evaluator, self.grid, self.target = evaluator, grid, target
        self.times: list[float] = [0.0]
        self.losses: list[dict[str, float]] = [dict(evaluator.base)]
        self.next = grid
        self.current: list[AdapterState] | None = None
        self.seen: list[AdapterState | None] = [None] * len(DOMAINS)
        self.reached: float | None = None
        self.steps = 0  # training steps the arm took (set when it ends)

    def __call__(self, now: float, experts: list[AdapterState]) -> None:
        """``experts`` hold from virtual time ``now`` on: record the grid points before it."""
        while now > self.next and self.reached is None:
            self._record()
        self.current = list(experts)

    def finish(self, until: float) -> None:
        """Record the grid points up to ``until`` (none after the target was reached)."""
        while self.next <= until + 1e-9 and self.reached is None:
            self._record()

    def _record(self) -> None:
        losses = dict(self.losses[-1])
        for index, state in enumerate(self.current or []):
            if self.seen[index] is not state:
                domain = DOMAINS[index]
                losses[domain] = self.evaluator.losses(state, domains=[domain])[domain]
                self.seen[index] = state
        self.times.append(self.next)
        self.losses.append(losses)
        if self.target and all(losses[d] <= self.target[d] for d in DOMAINS):
            self.reached = self.next
        self.next += self.grid


class Race:
    """Runs the race's arms for every seed the headline asks for."""

    def __init__(self, runner: Matrix, evaluator: Evaluator, preset: dict[str, Any]) -> None:
        self.runner, self.evaluator = runner, evaluator
        self.interval = float(preset["interval"])
        self.horizon = preset["rounds"] * SLOWDOWN * self.interval
        self.seeds = preset["seeds"]

    def _arm(
        self, settings: dict[str, Any] | None, seed: int, target: dict[str, float] | None
    ) -> Trace:
        torch.manual_seed(seed)
        workers = self.runner.workers(PER_EXPERT, "iid", seed, slow=SLOWDOWN)
        trace = Trace(self.evaluator, self.interval, target)

        def finished(worker: Any) -> bool:
            return worker.clock >= self.horizon or trace.reached is not None

        unit = lambda *_: 1.0  # noqa: E731
        if settings is None:
            run_sync(
                self.runner.bench,
                workers,
                steps_per_round=int(self.interval),
                cost=unit,
                finished=finished,
                observe=trace,
            )
        else:
            options, pull_wait = worker_side(settings)
            coordinator = Coordinator(self.runner.bench, **options)
            run_async(
                self.runner.bench,
                coordinator,
                workers,
                sync_interval=self.interval,
                cost=unit,
                finished=finished,
                observe=trace,
                pull_wait=pull_wait,
            )
            coordinator.close()
        self.runner.bench.occupant = None
        trace.finish(self.horizon)
        trace.steps = sum(w.steps for w in workers)
        return trace

    def run(
        self, strategies: dict[str, dict[str, Any] | None], headline: tuple[str, ...], sync: str
    ) -> dict[str, Any]:
        """Every arm; per arm its times to target, speedups over sync (same seed), steps."""
        base = self.evaluator.base
        targets, sync_times = [], []
        arms: dict[str, dict[str, Any]] = {}
        for seed in range(self.seeds):
            trace = self._arm(None, seed, None)
            final = trace.losses[-1]
            target = {d: base[d] - FRACTION * (base[d] - final[d]) for d in DOMAINS}
            hit = next(t for t, x in zip(trace.times, trace.losses) if _below(x, target))
            targets.append(target)
            sync_times.append(hit)
            _add(arms, sync, seed, hit, 1.0, trace)
        for arm, settings in strategies.items():
            if settings is None:
                continue
            for seed in range(self.seeds if arm in headline else 1):
                trace = self._arm(settings, seed, targets[seed])
                speedup = sync_times[seed] / trace.reached if trace.reached else 0.0
                _add(arms, arm, seed, trace.reached, speedup, trace)
            print(f"race {arm:40s} speedup {arms[arm]['speedup_mean']:.2f}", flush=True)
        return {
            "per_expert": PER_EXPERT,
            "slowdown": SLOWDOWN,
            "fraction": FRACTION,
            "horizon": self.horizon,
            "interval": self.interval,
            "targets": targets,
            "arms": arms,
        }


def _below(losses: dict[str, float], target: dict[str, float]) -> bool:
    return all(losses[d] <= target[d] for d in DOMAINS)


def _add(
    arms: dict[str, dict[str, Any]],
    arm: str,
    seed: int,
    time: float | None,
    speedup: float,
    trace: Trace,
) -> None:
    """Append one seed's result to the arm's row and refresh its summary."""
    row = arms.setdefault(arm, {"times": [], "speedups": [], "steps": [], "final": []})
    row["times"].append(time)
    row["speedups"].append(speedup)
    row["steps"].append(trace.steps)
    row["final"].append(mean(trace.losses[-1]))
    row["speedup_mean"] = mean(row["speedups"])
    row["speedup_sd"] = statistics.stdev(row["speedups"]) if seed > 0 else 0.0
    row["reached"] = sum(t is not None for t in row["times"])
