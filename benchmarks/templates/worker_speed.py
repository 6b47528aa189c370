"""``worker-speed``: FedMoE's training loop and real worker against a plain peft loop."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import fmt, loads, markdown_table

GPU_NOTE = (
    "\nNo GPU was available on this machine: the `--qwen05b-shape` comparison (plain vs "
    "FedMoE loop on a Qwen2.5-0.5B-shaped model, LoRA r=16) was not measured here; run "
    "`python -m benchmarks.worker_speed_bench --qwen05b-shape` on a GPU.\n"
)


def _model(v: dict[str, Any]) -> str:
    if v["shaped"]:
        return (
            "random-weight Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads, "
            f"intermediate 4864, vocab 151936), LoRA r={v['lora_rank']} on all projections"
        )
    return f"the `{v['base_model']}` preset, LoRA r={v['lora_rank']} on all projections"


def _worker(w: dict[str, Any] | None) -> str:
    if w is None:
        return ""
    return f"""
**Blocked on synchronisation.** The real worker trained for {w["train_seconds"]:.1f} s
with a {w["sync_interval"]:g} s sync interval and made {w["uploads"]} uploads while
training (the final upload in cleanup is not counted); it spent
{w["blocked_seconds"]:.3f} s blocked in `sync()` = **{w["blocked_share"]:.2%}** of
its training time (`WorkerJob.stats.blocked_seconds` / training wall time). The worker's own
summary says `blocked_share` {w["summary_blocked_share"]:.2%} and
`tokens_per_second` {w["summary_tokens_per_second"]:,.0f}; both count from the start
of training to the end of the final upload (which is blocked time too), not the setup.
Plain loop just before / after the worker run: {w["plain_before"]:,.0f} /
{w["plain_after"]:,.0f} tok/s (this machine is shared, so that bracketed ratio is noisy). The
load-robust estimate of the real worker's speed relative to the plain loop is (FedMoE loop ÷
plain, interleaved) × (1 − blocked share) = **{w["load_robust_ratio"]:.3f}**.
"""


def _ddp(d: dict[str, Any] | None) -> str:
    if d is None:
        return ""
    return f"""
**1 vs 2 DDP processes.** `LocalTrainer` on 1 process and on 2 torchrun ranks (gloo, 1
thread each, the same global batch: each rank trains half of it), {d["steps"]} timed steps
each: {d["one_process"]:,.0f} vs {d["two_processes"]:,.0f} tokens/s, speed-up
**{d["speedup"]:.2f}×**, scaling efficiency **{d["efficiency"]:.0%}** (2 processes ÷ twice
one). This machine has {d["cores"]} cores shared with other jobs, so the two ranks compete
with everything else for them: the figure shows the mechanics run, not what 2 GPUs give.
"""


def render(v: dict[str, Any]) -> str:
    """The section body."""
    rows = [[a["arm"], f"{a['tokens_per_second']:,.0f}", fmt(a["ratio"], 3)] for a in v["arms"]]
    w = v["worker"]
    if w is not None:
        rows.append(
            [
                "FedMoE WorkerJob (real syncs, 10 s)",
                f"{w['tokens_per_second']:,.0f}",
                fmt(w["ratio_to_bracket"], 3) + " (vs plain runs just before/after)",
            ]
        )
    before, after = loads(v["load_before"]), loads(v["load_after"])
    return f"""
**Method.** Model: {_model(v)}; device {v["device"]}; batch {v["batch_size"]}, max length
{v["max_length"]}, lr {v["lr"]}, same batches (the `{v["domain"]}` demo data, `BatchStream` seed
{v["seed"]}) for both loops; 1 torch thread. The plain loop is `get_peft_model`, AdamW, the
model's own loss (`labels=`), gradient clipping at {v["max_grad_norm"]} (FedMoE's default),
bf16 autocast only on CUDA (as `LocalTrainer`). The FedMoE arms switch packing and the
chunked cross-entropy off and on (`--packing`, `--cross-entropy`). The loops run in {v["rounds"]} alternating chunks of
{v["chunk"]} steps (ABBA order, after {v["warmup"]} warm-up steps each). Tokens are target tokens
(labels ≠ -100).

{markdown_table(["arm", "tokens/s", "÷ plain"], rows)}

FedMoE loop ({v.get("default_arm", "FedMoE LocalTrainer")}) / plain loop =
**{v["loop_ratio"]:.3f}**.
{_ddp(v.get("ddp"))}{_worker(w)}{"" if v["cuda"] else GPU_NOTE}
Load average (1, 5, 15 min) before {before}, after {after}; wall time
{v["wall_seconds"]:.0f} s.
"""
