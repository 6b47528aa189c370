"""``quality``: validation loss at equal token budgets, merges, federation vs centralised."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import fmt, loads, markdown_table


def _verdict(v: dict[str, Any]) -> str:
    """Which merge default the figures support."""
    winners = "; ".join(
        f"{arm}: {min(means, key=means.get)} ("
        + ", ".join(f"{m} {x:.3f}" for m, x in means.items())
        + ")"
        for arm, means in v["merge_means"].items()
    )
    listing = ", ".join(f"{m} {x:.3f}" for m, x in v["merge_overall"].items())
    best, gap, tie = v["merge_best"], v["merge_gap"], v["merge_tie"]
    if best == "cat" or gap < tie:
        decision = (
            f"Averaged over the arms ({listing}) no method beats cat by {tie} nats or more, so "
            "the figures support keeping **cat** as the default (it is also the only exact "
            "merge: B_cat·A_cat = Σ w_k·B_k·A_k, at the price of rank r·K)."
        )
    else:
        decision = (
            f"Averaged over the arms ({listing}), **{best}** beats cat by {gap:.3f} nats, so "
            f"the figures support {best} as the default on this setup."
        )
    return f"Best merge per arm (mean gateway loss) — {winners}. {decision}"


def _comparisons(v: dict[str, Any]) -> str:
    """Federation vs centralised, and sync vs async at equal tokens."""
    main, sync, one, _ = v["arms"]
    figures, kept = v["figures"], v["kept"]
    parts = [
        f"**Federation vs centralised** (means over domains; base {fmt(v['base_mean'])}, "
        f"centralised LoRA {fmt(v['central_mean'])}; in brackets the share of the centralised "
        "improvement over the base that is kept):"
    ]
    for label in (main, one):
        experts, gateway = figures[label]["experts"], figures[label]["gateway_cat"]
        parts.append(
            f"{label}: experts on their own domain {fmt(experts)} "
            f"({kept[label]['experts']:.0%}), gateway (cat) {fmt(gateway)} "
            f"({kept[label]['gateway']:.0%});"
        )
    if all(figures[x]["gateway_cat"] > figures[x]["experts"] for x in (main, one)):
        parts.append(
            "so what FedMoE gives up against centralised training is in the gateway: a "
            "uniform merge keeps only part of what the experts learned."
        )
    (e2, g2), (e1, g1) = [(figures[x]["experts"], figures[x]["gateway_cat"]) for x in (main, one)]
    if (e1 < e2) == (g1 > g2):
        parts.append("The better trained the experts, the worse their merged gateway did.")
    a, y = figures[main]["experts"], figures[sync]["experts"]
    ga, gs = figures[main]["gateway_cat"], figures[sync]["gateway_cat"]
    better = "sync FedAvg" if y < a else "FedMoE async"
    gap = v["sync_async_gap"]
    verdict = "the same losses" if a == y else f"{better} better by {gap:.3f} nats"
    parts.append(
        f"\n\n**Sync vs async at equal tokens** ({v['per_expert']} workers/expert): experts on "
        f"their own domain async {fmt(a)} vs sync {fmt(y)} ({verdict}; one worker with all "
        f"the data: {fmt(figures[one]['experts'])}); gateway (cat) async {fmt(ga)} vs sync "
        f"{fmt(gs)}. At equal tokens only the update rule differs. FedMoE's default "
        "(`--server-lr auto`, `--staleness-grace`, settled pulls and FedAvg rounds: README, "
        "*Update rule*) moves an expert by each update at once, starts each worker's next "
        "interval from the whole round and ends the round with FedAvg's token weights, "
        "without a barrier; the rule before issue 12 (η 1, pulling "
        "right after the upload) moved it by about their sum, and the worker that uploaded "
        "first went on without its peer's delta until its next sync. (Wall-time effects are "
        "`benchmarks.async_bench`'s subject; more layouts in the server strategies section.)"
    )
    return " ".join(parts)


def _server_lr(v: dict[str, Any]) -> str:
    main, sync, _, before = v["arms"]
    listing = "; ".join(
        f"{label}: experts {fmt(v['figures'][label]['experts'])}, gateway (cat) "
        f"{fmt(v['figures'][label]['gateway_cat'])}"
        for label in (main, before, sync)
    )
    return f"\n\n**The rule before and now, several workers per expert** (means over domains): {listing}."


def render(v: dict[str, Any]) -> str:
    """The section body."""
    domains = v["domains"]
    rows = [
        [r["model"], *(fmt(r["losses"].get(d)) for d in domains), fmt(r["mean"])] for r in v["rows"]
    ]
    tokens = ", ".join(f"{k} {x:,}" for k, x in v["tokens"].items())
    step_ms = ", ".join(f"{d} {x:.0f} ms" for d, x in v["step_ms"].items())
    before, after = loads(v["load_before"]), loads(v["load_after"])
    return f"""
**Method.** In one process, with the real library pieces (not subprocesses):
`LocalTrainer` steps on the `{v["base_model"]}` preset (LoRA r={v["lora_rank"]}, alpha={v["lora_alpha"]},
lr {v["lr"]}, batch {v["batch_size"]}), the real `CentralCoordinator` (default
inverse staleness decay, a=0.1; in a temp state dir, no HTTP) for FedMoE's asynchronous
updates, `aggregate.weighted_average` + `apply_update` for the synchronous FedAvg baseline,
and `GatewayMerge` (uniform weights) for the gateways. Each arm trains on the same target-token
budget: {v["budget"]:,} tokens per domain (≈ {v["steps"]} steps of {v["tokens_per_step"]:.0f} tokens); the
centralised LoRA gets {len(domains)}× that on the pooled data of all domains. Tokens actually
trained: {tokens}.

Workers run on virtual clocks (`benchmarks.simulation.run_async`; wall time is not this
benchmark's subject, so every step costs a nominal {v["nominal_step_ms"]:.0f} ms and runs are
deterministic; measured median steps here:
{step_ms}): the demo's 10 s sync
interval scaled by {v["time_scale"]} to {v["sync_interval"]:g} s = {v["round_steps"]} steps between uploads;
the sync baseline merges every {v["round_steps"]} steps, the same cadence. With {v["per_expert"]} workers
per expert each worker holds half of its domain's training data; async uploads had staleness mean
{v["staleness_mean"]:.2f} (max {v["staleness_max"]}), weight mean
{v["weight_mean"]:.3f}. With 1 worker per expert (the demo's layout) staleness
is always 0, so FedMoE is plain local training and the sync baseline is identical (FedAvg of
one delta is that delta; the optimizer state is kept), hence not run twice.
`sum (cat, weights 1)` is not a library option (GatewayMerge normalises weights): the exact
Σ_k B_k·A_k, shown to separate dilution (each expert at 1/3) from interference.

Validation loss (nats per target token, {v["validation_count"]} held-out
examples per domain; lower is better):

{markdown_table(["model", *domains, "mean"], rows)}

**Gateway default.** {_verdict(v)}

{_comparisons(v) + _server_lr(v)}

Load average (1, 5, 15 min) before {before}, after {after}; wall time
{v["wall_seconds"]:.0f} s; torch threads {v["threads"]}.
"""
