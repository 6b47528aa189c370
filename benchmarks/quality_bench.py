"""Quality at equal token budgets: base, experts, gateway merges, centralised, sync vs async.

Run: ``.venv/bin/python -m benchmarks.quality_bench [--quick] [--base-model tiny]``.

Everything runs in this one process with the real library pieces: ``LocalTrainer``
steps, the real ``CentralCoordinator`` (staleness decay + update rule) for FedMoE's
asynchronous updates, ``aggregate.weighted_average`` for the synchronous FedAvg
baseline, and ``GatewayMerge`` for the gateways (see ``benchmarks.simulation``).
Every arm trains on the same number of target tokens per domain.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.common import (
    DEMO_SYNC_INTERVAL,
    THREADS,
    Evaluator,
    demo_domains,
    mean,
    parser,
    shard,
    start,
    target_tokens,
)
from benchmarks.report import publish
from benchmarks.simulation import (
    Coordinator,
    SimWorker,
    Workbench,
    run_async,
    run_sync,
    stop_rule,
    worker_side,
)
from fedmoe import aggregate
from fedmoe.aggregate import AdapterState
from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.demo_data import DOMAINS
from fedmoe.strategy import MERGE_METHODS

TIME_SCALE = 0.25  # the demo's 10 s sync interval, scaled like benchmarks.async_bench
SYNC_INTERVAL = DEMO_SYNC_INTERVAL * TIME_SCALE
NOMINAL_STEP = 0.05  # virtual seconds per step (≈ the tiny preset's step here), for determinism
TIE = 0.02  # nats: merge methods closer than this are called a tie
# the rule before issue 12: every update at weight s(τ) (η 1), pulled right after the upload
BEFORE = {"server_lr": 1.0, "staleness_grace": False, "pull_wait": 0.0, "fedavg_rounds": False}


def loss_row(name: str, losses: dict[str, float]) -> dict[str, object]:
    """A table row: per-domain losses and their mean."""
    return {"model": name, "losses": dict(losses), "mean": mean(losses)}


def make_workers(bench: Workbench, domains: dict, per_expert: int, prefix: str) -> list[SimWorker]:
    """``per_expert`` workers per domain, each on a disjoint shard of its training data."""
    return [
        bench.worker(f"{prefix}-{d}-{i}", d, shard(domains[d].train, per_expert, i))
        for d in DOMAINS
        for i in range(per_expert)
    ]


def fedmoe_async(
    bench: Workbench,
    domains: dict,
    per_expert: int,
    budget: int,
    cost,
    settings: dict[str, Any] | None = None,
) -> tuple[list[AdapterState], list[SimWorker]]:
    """FedMoE: asynchronous uploads through the real coordinator, with its defaults or the
    ``settings`` given (and the workers' ``pull_wait``, ``simulation.worker_side``)."""
    options, pull_wait = worker_side(settings or {})
    coordinator = Coordinator(bench, **options)
    workers = make_workers(bench, domains, per_expert, f"async{per_expert}-{len(options)}")
    finished = stop_rule(horizon=None, budget=budget // per_expert)
    run_async(
        bench,
        coordinator,
        workers,
        sync_interval=SYNC_INTERVAL,
        cost=cost,
        finished=finished,
        pull_wait=pull_wait,
    )
    experts = [dict(e) for e in coordinator.experts()]
    coordinator.close()
    return experts, workers


def centralised(bench: Workbench, domains: dict, budget: int) -> tuple[AdapterState, int]:
    """One LoRA trained on the pooled data of every domain for the same total tokens."""
    pooled = [example for d in DOMAINS for example in domains[d].train]
    worker = bench.worker("centralised", "all", pooled)
    while worker.tokens < budget:
        bench.step(worker)
    state = bench.state_of(worker)
    bench.occupant = None
    return state, worker.tokens


def expert_rows(
    label: str, evaluator: Evaluator, experts: list[AdapterState]
) -> tuple[list[dict[str, object]], dict[str, float]]:
    """One row per expert (all domains) plus the diagonal (each expert on its own domain)."""
    table = {d: evaluator.losses(e) for d, e in zip(DOMAINS, experts)}
    diagonal = {d: table[d][d] for d in DOMAINS}
    rows = [loss_row(f"{label}: expert {d}", table[d]) for d in DOMAINS]
    rows.append(loss_row(f"{label}: each expert on its own domain", diagonal))
    return rows, diagonal


def gateway_losses(evaluator: Evaluator, experts: list[AdapterState]) -> dict[str, dict]:
    """Per-domain loss of the gateway under every merge method, plus an unnormalised sum."""
    result = {m: evaluator.gateway(experts, m) for m in MERGE_METHODS}
    lora = evaluator.lora
    summed = aggregate.merge_cat(experts, [1.0] * len(experts))
    result["sum (cat, weights 1)"] = evaluator.losses(
        summed, rank=lora.rank * len(experts), alpha=lora.alpha * len(experts)
    )
    return result


def analysis(
    base: dict[str, float],
    central: dict[str, float],
    diagonals: dict[str, dict[str, float]],
    gateways: dict[str, dict[str, dict[str, float]]],
) -> dict[str, object]:
    """The figures the section's conclusions are written from (labels in ``diagonals`` order)."""
    labels = list(diagonals)  # async (K per expert), sync (K), 1 worker/expert, async 1/K
    merge_means = {arm: {m: mean(g[m]) for m in MERGE_METHODS} for arm, g in gateways.items()}
    overall = {m: mean([means[m] for means in merge_means.values()]) for m in MERGE_METHODS}
    best = min(overall, key=overall.__getitem__)
    figures = {
        label: {"experts": mean(diagonals[label]), "gateway_cat": mean(gateways[label]["cat"])}
        for label in labels
    }
    base_mean, central_mean = mean(base), mean(central)

    def kept(value: float) -> float:
        return (base_mean - value) / (base_mean - central_mean)

    return {
        "arms": labels,
        "merge_means": merge_means,
        "merge_overall": overall,
        "merge_best": best,
        "merge_gap": overall["cat"] - overall[best],
        "merge_tie": TIE,
        "base_mean": base_mean,
        "central_mean": central_mean,
        "figures": figures,
        "kept": {
            label: {
                "experts": kept(figures[label]["experts"]),
                "gateway": kept(figures[label]["gateway_cat"]),
            }
            for label in (labels[0], labels[2])
        },
        "sync_async_gap": abs(figures[labels[0]]["experts"] - figures[labels[1]]["experts"]),
    }


def main() -> None:
    """Train every arm, evaluate, and write the ``quality`` section."""
    args, run = start(parser(__doc__.splitlines()[0]))
    steps = 30 if args.quick else 300
    per_expert = 2
    lora, train = LoraSettings(), TrainSettings()
    bench = Workbench(args.base_model, lora, train)
    domains = demo_domains(bench.tokenizer, validation_count=40 if args.quick else 60)
    evaluator = Evaluator(args.base_model, lora, domains)
    step_time = {d: bench.calibrate(domains[d].train) for d in DOMAINS}
    tokens_per_step = train.batch_size * mean([target_tokens(domains[d].train) for d in DOMAINS])
    budget = int(steps * tokens_per_step)
    round_steps = max(1, round(SYNC_INTERVAL / NOMINAL_STEP))

    def cost(_worker, _result, _seconds):
        return NOMINAL_STEP

    async2, workers2 = fedmoe_async(bench, domains, per_expert, budget, cost)
    sync_workers = make_workers(bench, domains, per_expert, "sync")
    sync2 = run_sync(
        bench,
        sync_workers,
        steps_per_round=round_steps,
        cost=cost,
        finished=stop_rule(horizon=None, budget=budget // per_expert),
    )
    async1, workers1 = fedmoe_async(bench, domains, 1, budget, cost)
    before, _ = fedmoe_async(bench, domains, per_expert, budget, cost, BEFORE)
    central, central_tokens = centralised(bench, domains, budget * len(DOMAINS))

    rows = [loss_row("base model", evaluator.base)]
    main_label, sync_label = (
        f"FedMoE async, {per_expert} workers/expert",
        f"sync FedAvg, {per_expert} workers/expert",
    )
    before_label = f"{main_label}, before issue 12 (η 1, pull at once)"
    arms = {
        main_label: async2,
        sync_label: sync2,
        "FedMoE, 1 worker/expert (demo layout)": async1,
        before_label: before,
    }
    gateways, diagonals = {}, {}
    for label, experts in arms.items():
        expert_table, diagonals[label] = expert_rows(label, evaluator, experts)
        rows += expert_table
        gateways[label] = gateway_losses(evaluator, experts)
        rows += [loss_row(f"{label}: gateway {m}", v) for m, v in gateways[label].items()]
    central_losses = evaluator.losses(central)
    rows.append(loss_row("centralised LoRA, pooled data", central_losses))

    staleness = [t for w in workers2 for t in w.staleness]
    weights = [x for w in workers2 for x in w.weights]
    values = {
        "base_model": args.base_model,
        "lora_rank": lora.rank,
        "lora_alpha": lora.alpha,
        "lr": bench.learning_rate,
        "batch_size": train.batch_size,
        "budget": budget,
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "tokens": {
            "async": sum(w.tokens for w in workers2),
            "sync": sum(w.tokens for w in sync_workers),
            "1 worker": sum(w.tokens for w in workers1),
            "centralised": central_tokens,
        },
        "nominal_step_ms": 1e3 * NOMINAL_STEP,
        "step_ms": {d: 1e3 * t for d, t in step_time.items()},
        "time_scale": TIME_SCALE,
        "sync_interval": SYNC_INTERVAL,
        "round_steps": round_steps,
        "per_expert": per_expert,
        "staleness_mean": mean(staleness) if staleness else 0.0,
        "staleness_max": max(staleness, default=0),
        "weight_mean": mean(weights) if weights else 1.0,
        "validation_count": len(domains[DOMAINS[0]].validation),
        "domains": list(DOMAINS),
        "rows": rows,
        **analysis(evaluator.base, central_losses, diagonals, gateways),
        "load_before": run.load,
        "load_after": list(os.getloadavg()),
        "wall_seconds": run.seconds(),
        "threads": THREADS,
    }
    publish("quality", "Quality at equal token budgets", values, args)


if __name__ == "__main__":
    main()
