"""``sync``: time blocked per sync and bytes moved, inline vs background, at 0.5B size."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import markdown_table


def render(v: dict[str, Any]) -> str:
    """The arms' table and what they are."""
    rows = [
        [
            a["arm"],
            "background" if a["background"] else "inline",
            a["upload_dtype"],
            a["syncs"],
            f"{1e3 * a['blocked_seconds_per_sync']:.1f}",
            f"{a['blocked_share']:.2%}",
            f"{a['bytes_up_per_sync'] / 1e6:.1f}",
            f"{a['bytes_down_per_sync'] / 1e6:.1f}",
            f"{a['skipped_pulls']} / {a['full_pulls']}",
        ]
        for a in v["arms"]
    ]
    table = markdown_table(
        [
            "arm",
            "mode",
            "upload dtype",
            "syncs",
            "blocked ms / sync",
            "blocked share",
            "MB up / sync",
            "MB down / sync",
            "pulls skipped / done",
        ],
        rows,
    )
    return f"""
A worker's real `Syncer` and `CoordinatorClient` against a real coordinator subprocess on
loopback, with an adapter shaped like Qwen2.5-0.5B's (LoRA r=16 on all seven projections,
random values, no model). A fake training step waits {v["step_seconds"]:g} s and then moves
every tensor; a sync is due every {v["sync_interval"]:g} s. `before` is the pre-issue-13
worker (inline, float32 upload, full download after every upload); blocked time is
`WorkerStats.blocked_seconds` (in the background mode: the snapshot copy and the rebase).
Loopback, not a shaped 1 Gbit/s link; a shared, loaded machine (2 cores, other engineers'
jobs), so absolute figures are noisy.

{table}
"""
