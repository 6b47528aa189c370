"""Quality at equal token budgets: base, experts, gateway merges, centralised, sync vs async.

Run: ``.venv/bin/python -m benchmarks.quality_bench [--quick] [--base-model tiny]``.

Everything runs in this one process with the real library pieces: ``LocalTrainer``
steps, the real ``CentralCoordinator`` (staleness decay + update rule) for FedMoE's
asynchronous updates, ``aggregate.weighted_average`` for the synchronous FedAvg
baseline, and ``GatewayMerge`` for the gateways (see ``benchmarks.simulation``).
Every arm trains on the same number of target tokens per domain.
"""

from __future__ import annotations

import time

from benchmarks.common import (
    DEMO_SYNC_INTERVAL,
    Evaluator,
    demo_domains,
    fmt,
    load_average,
    mean,
    parser,
    setup_torch,
    shard,
    target_tokens,
)
from benchmarks.report import markdown_table, publish
from benchmarks.simulation import Coordinator, SimWorker, Workbench, run_async, run_sync, stop_rule
from fedmoe import aggregate
from fedmoe.aggregate import AdapterState
from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.demo_data import DOMAINS
from fedmoe.strategy import MERGE_METHODS

TIME_SCALE = 0.25  # the demo's 10 s sync interval, scaled like benchmarks.async_bench
SYNC_INTERVAL = DEMO_SYNC_INTERVAL * TIME_SCALE
NOMINAL_STEP = 0.05  # virtual seconds per step (≈ the tiny preset's step here), for determinism
TIE = 0.02  # nats: merge methods closer than this are called a tie

Row = list[object]


def loss_row(name: str, losses: dict[str, float]) -> Row:
    """A table row: per-domain losses and their mean."""
    return [name, *(fmt(losses.get(d)) for d in DOMAINS), fmt(mean(losses))]


def make_workers(bench: Workbench, domains: dict, per_expert: int, prefix: str) -> list[SimWorker]:
    """``per_expert`` workers per domain, each on a disjoint shard of its training data."""
    return [
        bench.worker(f"{prefix}-{d}-{i}", d, shard(domains[d].train, per_expert, i))
        for d in DOMAINS
        for i in range(per_expert)
    ]


def fedmoe_async(
    bench: Workbench, domains: dict, per_expert: int, budget: int, cost, server_lr: float = 1.0
) -> tuple[list[AdapterState], list[SimWorker]]:
    """FedMoE: asynchronous uploads through the real coordinator (default s(τ), inverse)."""
    coordinator = Coordinator(bench, server_lr=server_lr)
    workers = make_workers(bench, domains, per_expert, f"async{per_expert}-lr{server_lr:g}")
    finished = stop_rule(horizon=None, budget=budget // per_expert)
    run_async(
        bench, coordinator, workers, sync_interval=SYNC_INTERVAL, cost=cost, finished=finished
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
) -> tuple[list[Row], dict[str, float]]:
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


def verdict(gateways: dict[str, dict[str, dict[str, float]]]) -> str:
    """Which merge default the figures support, over every arm's experts."""
    per_arm = {arm: {m: mean(g[m]) for m in MERGE_METHODS} for arm, g in gateways.items()}
    winners = "; ".join(
        f"{arm}: {min(means, key=means.get)} ("
        + ", ".join(f"{m} {v:.3f}" for m, v in means.items())
        + ")"
        for arm, means in per_arm.items()
    )
    overall = {m: mean([means[m] for means in per_arm.values()]) for m in MERGE_METHODS}
    best = min(overall, key=overall.get)
    gap = overall["cat"] - overall[best]
    listing = ", ".join(f"{m} {v:.3f}" for m, v in overall.items())
    if best == "cat" or gap < TIE:
        decision = (
            f"Averaged over the arms ({listing}) no method beats cat by {TIE} nats or more, so "
            "the figures support keeping **cat** as the default (it is also the only exact "
            "merge: B_cat·A_cat = Σ w_k·B_k·A_k, at the price of rank r·K)."
        )
    else:
        decision = (
            f"Averaged over the arms ({listing}), **{best}** beats cat by {gap:.3f} nats, so "
            f"the figures support {best} as the default on this setup."
        )
    return f"Best merge per arm (mean gateway loss) — {winners}. {decision}"


def comparisons(
    base: dict[str, float],
    central: dict[str, float],
    diagonals: dict[str, dict[str, float]],
    gateways: dict[str, dict[str, dict[str, float]]],
    per_expert: int,
) -> str:
    """The federation-vs-centralised and sync-vs-async paragraphs, from the figures."""
    labels = list(diagonals)  # async (per_expert), sync (per_expert), 1 worker/expert
    base_mean, central_mean = mean(base), mean(central)

    def kept(value: float) -> str:
        return f"{(base_mean - value) / (base_mean - central_mean):.0%}"

    parts = [
        f"**Federation vs centralised** (means over domains; base {fmt(base_mean)}, centralised "
        f"LoRA {fmt(central_mean)}; in brackets the share of the centralised improvement over "
        "the base that is kept):"
    ]
    pairs = {}
    for label in (labels[0], labels[2]):
        pairs[label] = mean(diagonals[label]), mean(gateways[label]["cat"])
        experts, gateway = pairs[label]
        parts.append(
            f"{label}: experts on their own domain {fmt(experts)} ({kept(experts)}), gateway "
            f"(cat) {fmt(gateway)} ({kept(gateway)});"
        )
    if all(gateway > experts for experts, gateway in pairs.values()):
        parts.append(
            "so what FedMoE gives up against centralised training is in the gateway: a "
            "uniform merge keeps only part of what the experts learned."
        )
    (e2, g2), (e1, g1) = pairs[labels[0]], pairs[labels[2]]
    if (e1 < e2) == (g1 > g2):
        parts.append("The better trained the experts, the worse their merged gateway did.")
    a, y = mean(diagonals[labels[0]]), mean(diagonals[labels[1]])
    ga, gs = mean(gateways[labels[0]]["cat"]), mean(gateways[labels[1]]["cat"])
    better = "sync FedAvg" if y < a else "FedMoE async"
    parts.append(
        f"\n\n**Sync vs async at equal tokens** ({per_expert} workers/expert): experts on their "
        f"own domain async {fmt(a)} vs sync {fmt(y)} ({better} better by {abs(a - y):.3f} nats; "
        f"one worker with all the data: {fmt(mean(diagonals[labels[2]]))}); gateway (cat) "
        f"async {fmt(ga)} vs sync {fmt(gs)}. At equal tokens only the update rule differs: "
        "async applies each worker's delta with weight s(τ) ≈ 1 (server_lr 1), so an expert "
        "moves by about the sum of its workers' deltas where FedAvg moves by their average, "
        "and the worker that uploads first continues without its peer's delta until its next "
        "sync. (Wall-time effects are `benchmarks.async_bench`'s subject.)"
    )
    return " ".join(parts)


def server_lr_note(diagonals: dict, gateways: dict, main: str, sync: str, damped: str) -> str:
    """Does scaling each update by 1/K (K workers per expert) close the gap to FedAvg?"""
    figures = {
        label: (mean(diagonals[label]), mean(gateways[label]["cat"]))
        for label in (main, damped, sync)
    }
    listing = "; ".join(
        f"{label}: experts {fmt(experts)}, gateway (cat) {fmt(gateway)}"
        for label, (experts, gateway) in figures.items()
    )
    return f"\n\n**`--server-lr` with several workers per expert** (means over domains): {listing}."


def main() -> None:
    """Train every arm, evaluate, and write the ``quality`` section."""
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup_torch()
    started, load_before = time.monotonic(), load_average()
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
    damped, _ = fedmoe_async(bench, domains, per_expert, budget, cost, 1.0 / per_expert)
    central, central_tokens = centralised(bench, domains, budget * len(DOMAINS))

    rows: list[Row] = [loss_row("base model", evaluator.base)]
    main_label, sync_label = (
        f"FedMoE async, {per_expert} workers/expert",
        f"sync FedAvg, {per_expert} workers/expert",
    )
    damped_label = f"{main_label}, server_lr 1/{per_expert}"
    arms = {
        main_label: async2,
        sync_label: sync2,
        "FedMoE, 1 worker/expert (demo layout)": async1,
        damped_label: damped,
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
    tokens = {
        "async": sum(w.tokens for w in workers2),
        "sync": sum(w.tokens for w in sync_workers),
        "1 worker": sum(w.tokens for w in workers1),
        "centralised": central_tokens,
    }
    text = comparisons(evaluator.base, central_losses, diagonals, gateways, per_expert)
    text += server_lr_note(diagonals, gateways, main_label, sync_label, damped_label)
    body = f"""
**Method.** In one process, with the real library pieces (not subprocesses):
`LocalTrainer` steps on the `{args.base_model}` preset (LoRA r={lora.rank}, alpha={lora.alpha},
lr {bench.learning_rate}, batch {train.batch_size}), the real `CentralCoordinator` (default
inverse staleness decay, a=0.1; in a temp state dir, no HTTP) for FedMoE's asynchronous
updates, `aggregate.weighted_average` + `apply_update` for the synchronous FedAvg baseline,
and `GatewayMerge` (uniform weights) for the gateways. Each arm trains on the same target-token
budget: {budget:,} tokens per domain (≈ {steps} steps of {tokens_per_step:.0f} tokens); the
centralised LoRA gets {len(DOMAINS)}× that on the pooled data of all domains. Tokens actually
trained: {", ".join(f"{k} {v:,}" for k, v in tokens.items())}.

Workers run on virtual clocks (`benchmarks.simulation.run_async`; wall time is not this
benchmark's subject, so every step costs a nominal {1e3 * NOMINAL_STEP:.0f} ms and runs are
deterministic; measured median steps here:
{", ".join(f"{d} {1e3 * t:.0f} ms" for d, t in step_time.items())}): the demo's 10 s sync
interval scaled by {TIME_SCALE} to {SYNC_INTERVAL:g} s = {round_steps} steps between uploads;
the sync baseline merges every {round_steps} steps, the same cadence. With {per_expert} workers
per expert each worker holds half of its domain's training data; async uploads had staleness mean
{mean(staleness) if staleness else 0:.2f} (max {max(staleness, default=0)}), weight mean
{mean(weights) if weights else 1:.3f}. With 1 worker per expert (the demo's layout) staleness
is always 0, so FedMoE is plain local training and the sync baseline is identical (FedAvg of
one delta is that delta; the optimizer state is kept), hence not run twice.
`sum (cat, weights 1)` is not a library option (GatewayMerge normalises weights): the exact
Σ_k B_k·A_k, shown to separate dilution (each expert at 1/3) from interference.

Validation loss (nats per target token, {len(domains[DOMAINS[0]].validation)} held-out
examples per domain; lower is better):

{markdown_table(["model", *DOMAINS, "mean"], rows)}

**Gateway default.** {verdict(gateways)}

{text}

Load average (1, 5, 15 min) before {load_before}, after {load_average()}; wall time
{time.monotonic() - started:.0f} s; torch threads 1.
"""
    publish("quality", "Quality at equal token budgets", body, write=args.write or not args.quick)


if __name__ == "__main__":
    main()
