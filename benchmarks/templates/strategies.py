"""``strategies``: the server strategies against synchronous FedAvg (the issue-12 matrix)."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import fmt, loads, markdown_table


def _cell(row: dict[str, Any], domain: str | None) -> str:
    """A loss (mean over seeds, ± standard deviation when there are several)."""
    value = row["mean"][domain] if domain else row["domain_mean"]
    spread = row["sd"][domain] if domain else row["domain_mean_sd"]
    return f"{value:.3f} ± {spread:.3f}" if row["seeds"] > 1 else f"{value:.3f}"


def _matrix(v: dict[str, Any]) -> str:
    domains = v["domains"]
    rows = []
    for key, layout in v["matrix"].items():
        per_expert, how = key.split("/")
        for arm, row in layout.items():
            worst = max(v["ratios"][key][arm].values())
            losses = [_cell(row, d) for d in [*domains, None]]
            tail = [f"{worst:.3f}", f"{row['staleness_mean']:.2f}"]
            rows.append([per_expert, how, arm, row["seeds"], *losses, *tail])
    headers = ["workers/expert", "shards", "arm", "seeds", *domains, "mean", "worst ÷ sync", "τ"]
    return markdown_table(headers, rows)


def _longer(v: dict[str, Any]) -> str:
    long = v.get("longer")
    if not long:
        return ""
    domains, rows = v["domains"], []
    for arm, row in long["rows"].items():
        worst = max(long["ratios"][arm].values())
        losses = [_cell(row, d) for d in [*domains, None]]
        rows.append([arm, *losses, f"{worst:.3f}", f"{row['staleness_mean']:.2f}"])
    headers = ["arm", *domains, "mean", "worst ÷ sync", "τ"]
    return (
        f"**A longer budget** ({long['budget_steps']} steps per expert, "
        f"{long['layout']} workers/shards, one seed): does a rule that gains in the short "
        f"run still hold nearer convergence?\n\n{markdown_table(headers, rows)}\n"
    )


def _race(v: dict[str, Any]) -> str:
    race = v["race"]
    rows = []
    for arm, row in race["arms"].items():
        times = [t for t in row["times"] if t is not None]
        spread = f" ± {row['speedup_sd']:.2f}" if len(row["speedups"]) > 1 else ""
        rows.append(
            [
                arm,
                len(row["times"]),
                f"{row['reached']}/{len(row['times'])}",
                fmt(sum(times) / len(times), 1) if times else "n/a",
                f"{row['speedup_mean']:.2f}{spread}",
                f"{sum(row['steps']) / len(row['steps']):.0f}",
            ]
        )
    headers = ["arm", "seeds", "reached", "time to target", "speedup vs sync", "steps"]
    return markdown_table(headers, rows)


def _goals(v: dict[str, Any]) -> str:
    g = v["goals"]

    def mark(ok: bool | None) -> str:
        return "met" if ok else "not measured" if ok is None else "**missed**"

    rows = [
        [
            arm,
            f"{g['worst_ratio'][arm]:.3f} ({mark(met['equal_tokens'])})",
            f"{g['speedup'].get(arm, 0.0):.2f}x ({mark(met['slow_worker'])})"
            if arm in g["speedup"]
            else "not raced",
            f"{g['one_worker_ratio'][arm]:.3f} ({mark(met['one_worker'])})",
        ]
        for arm, met in g["met"].items()
    ]
    headers = [
        "arm",
        "worst loss ÷ sync, 2-8 workers (≤ 1.00)",
        "speedup, 1 of 4 slow (≥ 2x)",
        "1 worker: loss ÷ before (≤ 1.00)",
    ]
    return markdown_table(headers, rows)


def render(v: dict[str, Any]) -> str:
    """The section body."""
    p, race, g = v["preset"], v["race"], v["goals"]
    mode = "A `--quick` run" if v["quick"] else "A full run"
    if v["quick"] and v.get("all_arms"):
        mode += " with the full preset's arms (`--all-arms`)"
    where = ", ".join(p["seeded"]) + " workers/shards" if p.get("seeded") else "every layout"
    return f"""
**Method.** `benchmarks.simulation` in one process: real `LocalTrainer` steps of the `tiny`
preset (LoRA r={v["lora_rank"]}, batch {v["batch_size"]}, lr {v["lr"]}), the real
`CentralCoordinator` (no HTTP) for the asynchronous arms, `aggregate.weighted_average` for
synchronous FedAvg, virtual clocks counted in steps of a full-speed worker. Every arm of
the matrix trains each expert on the same budget, {v["budget"]:,} target tokens
(≈ {p["budget_steps"]} steps), split evenly over its workers; a worker syncs every
{p["interval"]} steps (FedAvg: rounds of {p["interval"]} steps). Shards are disjoint:
`iid` interleaved, `non-iid` by sub-topic (the demo generator's template: Python task, SQL
table, documentation setting; sorted and cut, so with 8 workers most hold one sub-topic);
validation covers every sub-topic ({p["validation"]} examples per domain). Loss: each
expert on its own domain, nats per target token. Headline rows ({", ".join(v["headline"])})
ran {p["seeds"]} seeds at {where} (batch order, dropout): mean ± standard deviation (and
the speedups in the race); the other rows one seed. "worst ÷ sync": the largest per-domain ratio to synchronous FedAvg (same seeds).
Both arms are fair by construction: the same shards, seeds and batch orders, the same
tokens per worker, every trained step in the final expert (a finished worker uploads its
last partial window, as a worker's final upload on SIGTERM does; FedAvg's last round takes
the workers' remaining steps), each worker's AdamW state kept across syncs in both.
Asynchronous workers sync every {p["interval"]} steps of their own clock (all start
together, as `--align-syncs` has them) and pull as a background sync does: once the
acknowledgement's `settle_version` is in, or after the pull wait (a fifth of the interval),
training meanwhile; the "pull at once" arms pull right after the upload.
τ: mean staleness. FedBuff's `--buffer-timeout` counts wall time, so it is set out of
reach here. {mode}, {v["seconds"]:.0f} s on a shared 2-core machine (load
{loads(v["load_before"])} before, {loads(v["load_after"])} after; {v["threads"]} torch
thread), so figures are noisy at the second decimal.

{_matrix(v)}

{_longer(v)}
**The race** (one worker in {race["per_expert"]} per expert {race["slowdown"]:.0f}x slower, IID;
horizon {race["horizon"]:.0f} step-times = {p["rounds"]} synchronous rounds that wait for the slow
worker): the target on each domain is {race["fraction"]:.0%} of the improvement over the base
that synchronous FedAvg makes by the horizon; time to target in step-times (evaluated every
{race["interval"]:.0f}); speedup = FedAvg's time ÷ the arm's, same seed.

{_race(v)}

**Goals** (issue 12), per arm:

{_goals(v)}

Ranked by these figures alone (most goals met, a goal not measured counting as not met,
then the smallest worst ratio): **{g["best"]}**.
"""
