"""Server strategies at equal token budgets, 2 workers per expert (issue 12, first arms).

Run: ``.venv/bin/python -m benchmarks.strategy_bench [--quick] [--base-model tiny]``.

The same simulation as ``benchmarks.quality_bench`` (real ``LocalTrainer`` steps, the
real ``CentralCoordinator``): each arm trains 2 workers per expert on disjoint shards for
the same tokens, then each expert is evaluated on its own domain. Synchronous FedAvg is
the reference. Writes ``benchmarks/results/strategies.json``, rendered into RESULTS.md.
"""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks.common import Evaluator, demo_domains, mean, parser, setup_torch, target_tokens
from benchmarks.quality_bench import NOMINAL_STEP, SYNC_INTERVAL, make_workers
from benchmarks.report import publish
from benchmarks.simulation import Coordinator, Workbench, run_async, run_sync, stop_rule
from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.demo_data import DOMAINS

PER_EXPERT = 2
TITLE = "Server strategies: 2 workers per expert, equal tokens (issue 12)"
ARMS: dict[str, dict[str, Any]] = {
    "async, server_lr 1 (default)": {},
    "async, server_lr auto": {"server_lr": "auto"},
    "fedbuff K=2": {"strategy": "fedbuff", "buffer_size": 2},
    "fedbuff K=2, nesterov 0.7/0.9": {
        "strategy": "fedbuff",
        "buffer_size": 2,
        "server_optimizer": "nesterov",
    },
    "async auto, nesterov 0.7/0.9": {"server_lr": "auto", "server_optimizer": "nesterov"},
}


def run_arm(
    bench: Workbench, domains: dict, budget: int, settings: dict[str, Any], prefix: str
) -> list:
    """Train one asynchronous arm through the real coordinator; its experts."""
    coordinator = Coordinator(bench, **settings)
    workers = make_workers(bench, domains, PER_EXPERT, prefix)
    finished = stop_rule(horizon=None, budget=budget // PER_EXPERT)
    run_async(
        bench,
        coordinator,
        workers,
        sync_interval=SYNC_INTERVAL,
        cost=lambda *_: NOMINAL_STEP,
        finished=finished,
    )
    experts = [dict(e) for e in coordinator.experts()]
    coordinator.close()
    return experts


def main() -> None:
    """Every arm and the FedAvg reference; per-domain own-domain losses to JSON."""
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup_torch()
    started, load = time.monotonic(), list(os.getloadavg())
    steps = 30 if args.quick else 300
    lora, train = LoraSettings(), TrainSettings()
    bench = Workbench(args.base_model, lora, train)
    domains = demo_domains(bench.tokenizer, validation_count=40 if args.quick else 60)
    evaluator = Evaluator(args.base_model, lora, domains)
    tokens_per_step = train.batch_size * mean([target_tokens(domains[d].train) for d in DOMAINS])
    budget = int(steps * tokens_per_step)
    results: dict[str, dict[str, float]] = {}
    for index, (label, settings) in enumerate(ARMS.items()):
        experts = run_arm(bench, domains, budget, settings, f"arm{index}")
        results[label] = {d: evaluator.losses(e)[d] for d, e in zip(DOMAINS, experts)}
    sync = run_sync(
        bench,
        make_workers(bench, domains, PER_EXPERT, "sync"),
        steps_per_round=max(1, round(SYNC_INTERVAL / NOMINAL_STEP)),
        cost=lambda *_: NOMINAL_STEP,
        finished=stop_rule(horizon=None, budget=budget // PER_EXPERT),
    )
    results["sync FedAvg (reference)"] = {d: evaluator.losses(e)[d] for d, e in zip(DOMAINS, sync)}
    print(f"{'arm':34s} " + " ".join(f"{d[:12]:>12s}" for d in DOMAINS) + "        mean")
    for label, losses in results.items():
        cells = " ".join(f"{losses[d]:12.3f}" for d in DOMAINS)
        print(f"{label:34s} {cells} {mean(list(losses.values())):11.3f}")
    values = {"steps": steps, "budget": budget, "per_expert": PER_EXPERT, "losses": results}
    values |= {"seconds": time.monotonic() - started, "load_before": load, "quick": args.quick}
    publish("strategies", TITLE, values, args)


if __name__ == "__main__":
    main()
