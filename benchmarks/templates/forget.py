"""``forget``: the expert rebuilt by ``fedmoe forget`` against retraining without the party."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import loads, markdown_table


def render(v: dict[str, Any]) -> str:
    """The section body."""
    rows = [
        [label, f"{row['remaining']:.3f}", f"{row['removed']:.3f}"]
        for label, row in v["losses"].items()
    ]
    quick = "A `--quick` smoke run, one seed" if v["quick"] else "One seed"
    old, new = v["versions"]
    return f"""
Three parties train the Python expert asynchronously through the real coordinator (about {v["steps"]} steps each, an upload every {v["sync_steps"]} steps, so each trains on the others' updates): two on disjoint shards of the Python data, one on SQL data. `fedmoe forget` then removes the SQL party: {v["updates_removed"]} of its updates are left out and the expert goes from version {old} to {new}, rebuilt from the log in {v["forget_seconds"]:.2f} s (training took {v["train_seconds"]:.0f} s, retraining without the party {v["retrain_seconds"]:.0f} s). Validation loss (nats per target token, lower is better) on the remaining parties' data (Python) and on the removed party's data (SQL); the reference retrains from scratch without the party for the same steps. The rebuilt expert keeps the remaining parties' updates as they were sent, computed on states that included the removed party's (see README, *Removing a party*); retraining does not. {quick}, {v["seconds"]:.0f} s, on a machine shared with other jobs (load {loads(v["load_before"])} before).

{markdown_table(["expert", "remaining parties' data", "removed party's data"], rows)}
"""
