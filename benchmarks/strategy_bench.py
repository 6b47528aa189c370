"""Server strategies vs synchronous FedAvg: 1-8 workers per expert, IID and non-IID (issue 12).

Run: ``.venv/bin/python -m benchmarks.strategy_bench [--quick] [--base-model tiny]``.

The simulation of ``benchmarks.quality_bench`` (``benchmarks.simulation``: real
``LocalTrainer`` steps of the tiny preset in one process, the real ``CentralCoordinator``
without HTTP, virtual clocks). Two parts:

* the matrix: 1, 2, 4 and 8 workers per expert, shards IID or by sub-topic
  (``benchmarks._subtopics``), every arm on the same target-token budget per expert;
  each expert's validation loss on its own domain; synchronous FedAvg is the reference;
* the race (``benchmarks._race``): 4 workers per expert, one of them 4x slower; the
  virtual time each arm needs to reach 90% of the improvement synchronous FedAvg makes
  by the horizon.

Writes ``benchmarks/results/strategies.json``, rendered into RESULTS.md.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

from benchmarks._race import Race
from benchmarks._subtopics import SPLITS, coverage, split, subtopics
from benchmarks.common import Evaluator, demo_domains, mean, parser, setup_torch, target_tokens
from benchmarks.report import publish
from benchmarks.simulation import (
    Coordinator,
    Workbench,
    run_async,
    run_sync,
    stop_rule,
    worker_side,
)
from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.demo_data import DOMAINS

TITLE = "Server strategies: 1-8 workers per expert, IID and non-IID (issue 12)"
SYNC = "sync FedAvg"
BEFORE = "async, η 1 (before)"
AT_ONCE = "async, η auto, unsettled (pull at once, every τ decays)"
DEFAULT = "async, η auto, settled pull, FedAvg rounds (default)"
NO_ROUNDS = "async, η auto, settled pull, no rounds"
MEAN = "async, η mean"
AGREE = "async, η agree, settled pull"
NO_TIMEOUT = 1e9  # the buffer timeout is wall time; virtual-time runs must not hit it
# the rule before settled pulls: every τ decays, and a worker pulls right after its upload
AT_ONCE_SETTINGS = {"staleness_grace": False, "pull_wait": 0.0}
#: label -> coordinator settings and the workers' "pull_wait" (None: synchronous FedAvg
#: rounds, not the coordinator); pull_wait not given: the worker's default
STRATEGIES: dict[str, dict[str, Any] | None] = {
    SYNC: None,
    BEFORE: {"server_lr": 1.0, "fedavg_rounds": False} | AT_ONCE_SETTINGS,
    AT_ONCE: {"server_lr": "auto"} | AT_ONCE_SETTINGS,
    DEFAULT: {"server_lr": "auto"},
    NO_ROUNDS: {"server_lr": "auto", "fedavg_rounds": False},
    AGREE: {"server_lr": "agree"},
}
FULL_ONLY: dict[str, dict[str, Any] | None] = {
    MEAN: {"server_lr": "mean"},
    "fedbuff K=2, η auto": {
        "strategy": "fedbuff",
        "buffer_size": 2,
        "server_lr": "auto",
        "buffer_timeout": NO_TIMEOUT,
    },
    "fedbuff K=2, nesterov 0.7/0.9": {
        "strategy": "fedbuff",
        "buffer_size": 2,
        "server_optimizer": "nesterov",
        "buffer_timeout": NO_TIMEOUT,
    },
    "async η auto, adam": {"server_lr": "auto", "server_optimizer": "adam"},
}
STALENESS: dict[str, dict[str, Any]] = {
    "async η auto, s(τ) constant": {"server_lr": "auto", "staleness": "constant"},
    "async η auto, s(τ) polynomial a=0.5": {
        "server_lr": "auto",
        "staleness": "polynomial",
        "a": 0.5,
    },
}
HEADLINE = (SYNC, AT_ONCE, DEFAULT)  # the rows run with every seed
STALENESS_LAYOUT = (4, "non-iid")
# the longer budget: is a rule that wins the short run still sound nearer convergence?
LONGER_LAYOUT, LONGER_ARMS = (2, "iid"), (SYNC, AT_ONCE, DEFAULT, NO_ROUNDS, AGREE)
PRESETS = {
    # quick: the headline rows get their seeds in every layout with several workers
    "quick": {
        "budget_steps": 30,
        "interval": 3,
        "seeds": 3,
        "seeded": [f"{k}/{how}" for k in (2, 4, 8) for how in SPLITS],
        "rounds": 4,
        "validation": 40,
        "longer": 5,  # x the budget, one seed, LONGER_LAYOUT (0: none)
    },
    "full": {
        "budget_steps": 240,
        "interval": 10,
        "seeds": 3,
        "seeded": None,  # every layout
        "rounds": 10,
        "validation": 60,
        "longer": 0,  # the full budget is long already
    },
}


class Matrix:
    """Runs one arm of the matrix (layout, split, strategy, seed): own-domain losses."""

    def __init__(self, bench: Workbench, evaluator: Evaluator, domains: dict, budget: int) -> None:
        self.bench, self.evaluator, self.domains, self.budget = bench, evaluator, domains, budget
        self.labels = subtopics(domains)
        self.count = 0

    def workers(self, per_expert: int, how: str, seed: int, slow: float = 1.0) -> list:
        """``per_expert`` workers per domain on disjoint shards; the last one ``slow``x slower."""
        self.count += 1
        return [
            self.bench.worker(
                f"run{self.count}-{d}-{i}",
                d,
                split(self.domains[d].train, self.labels[d], per_expert, i, how),
                slowdown=slow if i == per_expert - 1 else 1.0,
                seed=seed,
            )
            for d in DOMAINS
            for i in range(per_expert)
        ]

    def run(
        self, per_expert: int, how: str, settings: dict[str, Any] | None, seed: int, interval: int
    ) -> dict[str, Any]:
        """Train one arm on the token budget; its experts' losses and its staleness."""
        torch.manual_seed(seed)
        workers = self.workers(per_expert, how, seed)
        finished = stop_rule(horizon=None, budget=self.budget // per_expert)
        unit = lambda *_: 1.0  # noqa: E731 - virtual time in steps of a full-speed worker
        if settings is None:
            experts = run_sync(
                self.bench, workers, steps_per_round=interval, cost=unit, finished=finished
            )
        else:
            options, pull_wait = worker_side(settings)
            coordinator = Coordinator(self.bench, **options)
            run_async(
                self.bench,
                coordinator,
                workers,
                sync_interval=interval,
                cost=unit,
                finished=finished,
                pull_wait=pull_wait,
            )
            experts = [dict(e) for e in coordinator.experts()]
            coordinator.close()
        self.bench.occupant = None
        staleness = [t for w in workers for t in w.staleness]
        return {
            "losses": {
                d: self.evaluator.losses(e, domains=[d])[d] for d, e in zip(DOMAINS, experts)
            },
            "tokens": sum(w.tokens for w in workers),
            "staleness_mean": mean(staleness) if staleness else 0.0,
            "staleness_max": max(staleness, default=0),
        }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds, per domain and of the domain mean."""
    per_domain = {d: [r["losses"][d] for r in runs] for d in DOMAINS}
    means = [mean(r["losses"]) for r in runs]

    def sd(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    return {
        "seeds": len(runs),
        "runs": runs,
        "mean": {d: mean(v) for d, v in per_domain.items()},
        "sd": {d: sd(v) for d, v in per_domain.items()},
        "domain_mean": mean(means),
        "domain_mean_sd": sd(means),
        "tokens": mean([r["tokens"] for r in runs]),
        "staleness_mean": mean([r["staleness_mean"] for r in runs]),
        "staleness_max": max(r["staleness_max"] for r in runs),
    }


def ratios(layout: dict[str, Any], reference: str) -> dict[str, dict[str, float]]:
    """Per arm and domain: its loss ÷ the reference's, over the seeds both ran."""
    out = {}
    for arm, row in layout.items():
        seeds = min(row["seeds"], layout[reference]["seeds"])
        base = [r["losses"] for r in layout[reference]["runs"][:seeds]]
        mine = [r["losses"] for r in row["runs"][:seeds]]
        out[arm] = {d: mean([m[d] for m in mine]) / mean([b[d] for b in base]) for d in DOMAINS}
    return out


def goals(matrix: dict[str, dict[str, Any]], race: dict[str, Any]) -> dict[str, Any]:
    """Which arm meets which of the issue's three goals (worst ratios, speedups)."""
    arms = [a for a in matrix["1/iid"] if a != SYNC]
    multi = [key for key in matrix if not key.startswith("1/")]
    worst = {
        arm: max(max(ratios(matrix[key], SYNC)[arm].values()) for key in multi)
        for arm in arms
        if all(arm in matrix[key] for key in multi)
    }
    one = {arm: max(ratios(matrix["1/iid"], BEFORE)[arm].values()) for arm in arms}
    speedup = {arm: row["speedup_mean"] for arm, row in race["arms"].items() if arm != SYNC}
    met = {
        arm: {
            "equal_tokens": worst[arm] <= 1.0,
            "slow_worker": speedup[arm] >= 2.0 if arm in speedup else None,  # None: not raced
            "one_worker": one[arm] <= 1.0,
        }
        for arm in worst
    }

    def rank(arm: str) -> tuple[int, float]:
        """Most goals met (a goal not measured is not met), then the smallest worst ratio."""
        return -sum(ok is True for ok in met[arm].values()), worst[arm]

    return {
        "worst_ratio": worst,
        "one_worker_ratio": one,
        "speedup": speedup,
        "met": met,
        "best": min(worst, key=rank),
    }


def longer(
    bench: Workbench, evaluator: Evaluator, domains: dict, budget: int, preset: dict[str, Any]
) -> dict[str, Any] | None:
    """The ``LONGER_ARMS`` on ``preset["longer"]`` times the budget (one seed)."""
    if not preset["longer"]:
        return None
    runner = Matrix(bench, evaluator, domains, budget * preset["longer"])
    per_expert, how = LONGER_LAYOUT
    rows: dict[str, dict[str, Any]] = {}
    for arm in LONGER_ARMS:
        settings = (STRATEGIES | FULL_ONLY)[arm]
        rows[arm] = summarise([runner.run(per_expert, how, settings, 0, preset["interval"])])
        print(f"longer {arm:40s} {rows[arm]['domain_mean']:.3f}", flush=True)
    return {
        "layout": f"{per_expert}/{how}",
        "budget_steps": preset["budget_steps"] * preset["longer"],
        "rows": rows,
        "ratios": ratios(rows, SYNC),
    }


def main() -> None:
    """The matrix, the staleness sweep and the race; writes the ``strategies`` section."""
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--budget-steps", type=int, help="Override the preset's token budget.")
    options.add_argument("--seeds", type=int, help="Seeds of the headline rows (preset: 3).")
    options.add_argument("--rounds", type=int, help="Synchronous rounds of the race's horizon.")
    options.add_argument(
        "--all-arms",
        action="store_true",
        help="With --quick: also the arms only the full preset runs (η mean, FedBuff, the "
        "server optimizers), one seed each.",
    )
    args = options.parse_args()
    setup_torch()
    started, load = time.monotonic(), list(os.getloadavg())
    preset = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("budget_steps", "seeds", "rounds"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    lora, train = LoraSettings(), TrainSettings()
    bench = Workbench(args.base_model, lora, train)
    domains = demo_domains(bench.tokenizer, validation_count=preset["validation"])
    evaluator = Evaluator(args.base_model, lora, domains)
    tokens_per_step = train.batch_size * mean([target_tokens(domains[d].train) for d in DOMAINS])
    budget = int(preset["budget_steps"] * tokens_per_step)
    runner = Matrix(bench, evaluator, domains, budget)
    strategies = STRATEGIES | ({} if args.quick and not args.all_arms else FULL_ONLY)
    layouts = [(1, "iid")] + [(k, how) for k in (2, 4, 8) for how in SPLITS]
    matrix: dict[str, dict[str, Any]] = {}
    for per_expert, how in layouts:
        rows = dict(strategies)
        if (per_expert, how) == STALENESS_LAYOUT:
            rows |= STALENESS
        key = f"{per_expert}/{how}"
        layout = matrix[key] = {}
        seeded = preset["seeded"] is None or key in preset["seeded"]
        for arm, settings in rows.items():
            seeds = range(preset["seeds"] if arm in HEADLINE and seeded else 1)
            runs = [runner.run(per_expert, how, settings, s, preset["interval"]) for s in seeds]
            layout[arm] = summarise(runs)
            print(f"{per_expert}/{how:8s} {arm:40s} {layout[arm]['domain_mean']:.3f}", flush=True)
    long_run = longer(bench, evaluator, domains, budget, preset)
    race = Race(runner, evaluator, preset).run(strategies, HEADLINE, SYNC)
    values = {
        "preset": preset,
        "quick": args.quick,
        "all_arms": bool(args.all_arms or not args.quick),
        "budget": budget,
        "tokens_per_step": tokens_per_step,
        "batch_size": train.batch_size,
        "lr": bench.learning_rate,
        "lora_rank": lora.rank,
        "domains": list(DOMAINS),
        "base": evaluator.base,
        "coverage": {
            d: {str(k): coverage(runner.labels[d], k) for k in (2, 4, 8)} for d in DOMAINS
        },
        "strategies": {arm: settings for arm, settings in (strategies | STALENESS).items()},
        "headline": list(HEADLINE),
        "staleness_layout": f"{STALENESS_LAYOUT[0]}/{STALENESS_LAYOUT[1]}",
        "matrix": matrix,
        "ratios": {key: ratios(layout, SYNC) for key, layout in matrix.items()},
        "race": race,
        "longer": long_run,
        "goals": goals(matrix, race),
        "load_before": load,
        "load_after": list(os.getloadavg()),
        "seconds": time.monotonic() - started,
        "threads": torch.get_num_threads(),
    }
    publish("strategies", TITLE, values, args)


if __name__ == "__main__":
    main()
