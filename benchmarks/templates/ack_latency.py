"""``ack-latency``: the write-ahead log's acknowledgement against the coordinator before it
and the FLOOR, for 0.5B- and 7B-shaped bfloat16 bodies."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import markdown_table, ms

COLUMNS = ["adapter", "bf16 body", "uploads (new / before / FLOOR)", "new p50 ms",
           "before p50 ms", "FLOOR p50 ms", "new / FLOOR", "before / FLOOR",
           "new p90 ms"]  # fmt: skip


def render(v: dict[str, Any]) -> str:
    """The latency table and how it was taken."""
    rows = [
        [r["adapter"], f"{r['body_bytes'] / 1e6:.1f} MB",
         " / ".join(str(r["uploads"][k]) for k in ("new", "before", "floor")),
         ms(r["p50_ms"]["new"]), ms(r["p50_ms"]["before"]), ms(r["p50_ms"]["floor"]),
         f"{r['ratio_new']:.2f}x", f"{r['ratio_before']:.2f}x", ms(r["p90_ms"]["new"])]
        for r in v["rows"]
    ]  # fmt: skip
    return f"""
One client uploads the same bfloat16 delta sequentially (staleness 0, one expert) to three
servers started side by side, in alternating runs of {v["seconds"]:g} s ({v["rounds"]} rounds
each): *new* is this checkout's coordinator (the update is durable by one fsync of its log
record: the body as received; snapshots are written in the background), *before* is the
coordinator of commit {v["before"]} (a float32 snapshot of the expert and a second fsync
for the ledger row per update; its `fedmoe` package from `git archive`), and the FLOOR
reads the same bytes over loopback HTTP and writes them with one fsync, nothing else.
Both coordinators hash the new expert for the acknowledgement's `state_sha256`. Client and
servers share 2 cores, and the FLOOR's fsync alone varies by half from one upload to the
next: figures are noisy, compare within a row.

{markdown_table(COLUMNS, rows)}
"""
