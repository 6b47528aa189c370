"""``strategies``: the server-side aggregation strategies against synchronous FedAvg."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import loads, markdown_table


def render(v: dict[str, Any]) -> str:
    """The section body."""
    losses: dict[str, dict[str, float]] = v["losses"]
    domains = list(next(iter(losses.values())))
    rows = [
        [arm, *(f"{row[d]:.3f}" for d in domains), f"{sum(row.values()) / len(row):.3f}"]
        for arm, row in losses.items()
    ]
    quick = "A `--quick` smoke run, one seed" if v["quick"] else "One seed"
    return f"""
{v["per_expert"]} workers per expert at equal speed, the same token budget for every arm ({v["budget"]:,} target tokens per expert, {v["steps"]} steps per worker); validation loss of each expert on its own domain (nats per target token, lower is better). {quick}, {v["seconds"]:.0f} s, on a machine shared with other jobs (load {loads(v["load_before"])} before). Too short to choose a default from: the default stays `--strategy async` with η = 1.

{markdown_table(["arm", *domains, "mean"], rows)}
"""
