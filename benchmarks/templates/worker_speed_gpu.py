"""``worker-speed-gpu``: plain peft loop vs FedMoE's loop with each speed feature on a GPU."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import fmt, markdown_table


def _row(arm: dict[str, Any]) -> list[str]:
    if "error" in arm:
        return [arm["arm"], "failed", "", "", arm["error"][:120]]
    peak = "" if arm["peak_gib"] is None else f"{arm['peak_gib']:.1f}"
    ratio = fmt(arm["ratio"], 2) if "ratio" in arm else ""
    return [arm["arm"], f"{arm['tokens_per_second']:,.0f}", ratio, peak, ""]


def render(v: dict[str, Any]) -> str:
    """The section body."""
    sizes = v["sizes"]
    rows = [_row(arm) for arm in v["arms"]]
    return f"""
**Method.** Device {v["device"]}, torch {v["torch"]}. Random-weight Qwen2.5 shapes in
bfloat16, LoRA r={v["lora_rank"]} on all projections, batch {sizes["batch"]} ×
{sizes["length"]} tokens (every token a target; "variable length": 1/4 to 1 of that, so
padding exists to remove), {sizes["warmup"]} warm-up steps then {sizes["steps"]} timed
steps ({sizes["steps_7b"]} for the 7B shape), one arm after the other. Peak memory is
`torch.cuda.max_memory_allocated` over the arm. ÷ plain: tokens/s relative to the plain
peft loop of the same shape and data (the row marked "plain" in each group).

{markdown_table(["arm", "tokens/s", "÷ plain", "peak GiB", "note"], rows)}

Wall time {v["wall_seconds"]:.0f} s.
"""
