"""Removing a party (issue 16): the rebuilt expert against retraining without that party.

Run: ``.venv/bin/python -m benchmarks.forget_bench [--quick] [--base-model tiny]``.

Three parties train the Python expert through the real ``CentralCoordinator`` (the same
simulation as ``benchmarks.quality_bench``: real ``LocalTrainer`` steps, asynchronous
uploads on virtual clocks): two on disjoint shards of the Python data, the third, the one
removed afterwards, on SQL data (so that its contribution is visible in the losses).
``Forgetter.forget`` then rebuilds the expert without the third party from the log. The
reference retrains from scratch with only the two remaining parties for the same steps.
Losses are measured on the remaining parties' data (Python validation) and on the
removed party's data (SQL validation). Writes ``benchmarks/results/forget.json``.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import Evaluator, demo_domains, parser, shard, start, target_tokens
from benchmarks.quality_bench import NOMINAL_STEP
from benchmarks.report import publish
from benchmarks.simulation import Coordinator, SimWorker, Workbench, run_async, stop_rule
from fedmoe.aggregate import AdapterState

TITLE = "Removing a party: rebuilt expert against retraining without it (issue 16)"
EXPERT, REMAINING, REMOVED = "python_expert", "python_expert", "sql_expert"
SYNC_STEPS = 5  # an upload every 5 steps: the parties train on each other's updates


def parties(bench: Workbench, domains: dict, *, with_removed: bool) -> list[SimWorker]:
    """Two parties on Python shards, and (``with_removed``) one on SQL data."""
    workers = [
        bench.worker(f"party-{i}", EXPERT, shard(domains[REMAINING].train, 2, i)) for i in (0, 1)
    ]
    if with_removed:
        workers.append(bench.worker("party-removed", EXPERT, domains[REMOVED].train))
    return workers


def train(
    bench: Workbench, domains: dict, budget: int, *, with_removed: bool
) -> tuple[Coordinator, AdapterState, float]:
    """One federation of the Python expert; its coordinator, expert and seconds taken."""
    began = time.monotonic()
    coordinator = Coordinator(bench)
    run_async(
        bench,
        coordinator,
        parties(bench, domains, with_removed=with_removed),
        sync_interval=SYNC_STEPS * NOMINAL_STEP,
        cost=lambda *_: NOMINAL_STEP,
        finished=stop_rule(horizon=None, budget=budget),
    )
    return coordinator, dict(coordinator.core.experts[EXPERT].state), time.monotonic() - began


def main() -> None:
    """Train with all three parties, forget one, retrain without it; losses to JSON."""
    args, run = start(parser(__doc__.splitlines()[0]))
    steps = 30 if args.quick else 200
    bench = Workbench(args.base_model)
    domains = demo_domains(bench.tokenizer, validation_count=40 if args.quick else 60)
    evaluator = Evaluator(args.base_model, bench.lora, domains)
    budget = int(steps * bench.train.batch_size * target_tokens(domains[REMAINING].train))
    wanted = [REMAINING, REMOVED]

    coordinator, before, train_seconds = train(bench, domains, budget, with_removed=True)
    began = time.monotonic()
    report = coordinator.core.forgetting.forget("party-removed")
    forget_seconds = time.monotonic() - began
    rebuilt = dict(coordinator.core.experts[EXPERT].state)
    coordinator.close()
    retrain, retrained, retrain_seconds = train(bench, domains, budget, with_removed=False)
    retrain.close()

    losses: dict[str, dict[str, float]] = {
        "base model (no adapter)": {d: evaluator.base[d] for d in wanted},
        "all three parties (before forget)": evaluator.losses(before, domains=wanted),
        "rebuilt by forget": evaluator.losses(rebuilt, domains=wanted),
        "retrained without the party": evaluator.losses(retrained, domains=wanted),
    }
    for label, row in losses.items():
        print(f"{label:36s} remaining {row[REMAINING]:.3f}  removed {row[REMOVED]:.3f}")
    values: dict[str, Any] = {
        "steps": steps,
        "sync_steps": SYNC_STEPS,
        "budget": budget,
        "losses": {
            label: {"remaining": r[REMAINING], "removed": r[REMOVED]} for label, r in losses.items()
        },
        "updates_removed": report.updates_removed,
        "versions": [report.experts[0].old_version, report.experts[0].new_version],
        "forget_seconds": forget_seconds,
        "train_seconds": train_seconds,
        "retrain_seconds": retrain_seconds,
        "seconds": run.seconds(),
        "load_before": run.load,
        "quick": args.quick,
    }
    publish("forget", TITLE, values, args)


if __name__ == "__main__":
    main()
