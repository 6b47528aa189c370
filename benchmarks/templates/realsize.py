"""``realsize``: Qwen2.5-0.5B/1.5B/7B-shaped adapters, shaped link, memory, 30 workers."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import Column, column_table, loads, markdown_table, ms

MB = 1e6
BLOCKED_GOAL = 0.01  # of training time, 7B at a 10 s interval
ACK_GOAL = 1.5  # × the FLOOR, for the 0.5B (17.6 MB) and 7B (80.8 MB) bodies
ACK_GOAL_SIZES = ("0.5B", "7B")
MEMORY_GOAL_MIB = 2048.0  # 30 experts of 0.5B size


def _mb(count: float) -> str:
    return f"{count / MB:.1f} MB"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


# A peer's step comes down in its own safetensors container (tensor names prefixed
# ``step<i>.``, metadata naming its update id and weight): a few KB more than the upload's.
CONTAINER_SLACK = 64 * 1024


def _bytes_ok(size: dict[str, Any]) -> bool:
    """Up ≤ one bf16 delta; down: nothing when sole, one bf16 delta (and its container's
    header) with a peer."""
    sole, peer, delta = size["sync"], size.get("sync_with_peer"), size["bf16_body_bytes"]
    ok = bool(sole["payload_bytes_up_per_sync"] <= delta)
    ok = ok and sole["payload_bytes_down_per_sync"] == 0
    if peer is not None:
        ok = ok and peer["payload_bytes_up_per_sync"] <= delta
        ok = ok and peer["payload_bytes_down_per_sync"] <= delta + CONTAINER_SLACK
    return ok


def _sync_row(s: dict[str, Any], arm: str, sync: dict[str, Any]) -> list[object]:
    return [
        s["model"],
        arm,
        f"{s['params'] / 1e6:.2f} M",
        f"{s['float32_bytes'] / MB:.1f}",
        f"{s['bf16_body_bytes'] / MB:.1f}",
        sync["syncs"],
        f"{sync['wire_bytes_up_per_sync'] / MB:.2f}",
        f"{sync['wire_bytes_down_per_sync'] / MB:.2f}",
        f"{sync['skipped_pulls']} / {sync['full_pulls']}",
        f"{sync['in_flight_seconds_mean']:.2f}",
        ms(1e3 * sync["blocked_seconds_per_sync"]),
        ms(1e3 * sync["blocked_cpu_seconds_per_sync"]),
        f"{sync['blocked_share']:.2%}",
    ]


def _sync_table(sizes: list[dict[str, Any]]) -> str:
    rows = []
    for s in sizes:
        rows.append(_sync_row(s, "sole worker", s["sync"]))
        if "sync_with_peer" in s:
            peer = s["sync_with_peer"]
            rows.append(_sync_row(s, f"with a peer (peer uploads: {peer['peer_uploads']})", peer))
    headers = [
        "adapter (r=16, 7 projections)",
        "worker",
        "params",
        "float32 MB",
        "bf16 delta MB",
        "syncs",
        "MB up / sync (wire)",
        "MB down / sync (wire)",
        "pulls skipped / done",
        "sync in flight s",
        "blocked ms / sync",
        "of which CPU ms",
        "blocked share",
    ]
    return markdown_table(headers, rows)


def _ack_table(sizes: list[dict[str, Any]]) -> str:
    columns: list[Column] = [
        ("adapter", lambda s: s["model"]),
        ("bf16 body MB", lambda s: f"{s['ack']['body_bytes'] / MB:.1f}"),
        ("uploads", lambda s: s["ack"]["uploads"]),
        ("coordinator ack p50 ms", lambda s: ms(s["ack"]["coordinator_p50_ms"])),
        ("FLOOR p50 ms", lambda s: ms(s["ack"]["floor_p50_ms"])),
        ("coordinator / FLOOR", lambda s: f"{s['ack']['ratio']:.2f}x"),
        ("CPU ms / upload, coordinator / FLOOR", _cpu_cell),
        ("coordinator peak RSS MiB", lambda s: f"{s['coordinator_peak_rss_mib']:,.0f}"),
    ]
    return column_table(columns, sizes)


def _cpu_cell(size: dict[str, Any]) -> str:
    """Both server processes' CPU time per upload (not measured before this column)."""
    ack = size["ack"]
    if "coordinator_cpu_ms_per_upload" not in ack:
        return "–"
    coordinator, floor = ack["coordinator_cpu_ms_per_upload"], ack["floor_cpu_ms_per_upload"]
    return f"{coordinator:.0f} / {floor:.0f}"


def _memory_table(memory: list[dict[str, Any]]) -> str:
    columns: list[Column] = [
        ("experts", lambda m: m["experts"]),
        ("RSS idle MiB", lambda m: f"{m['rss_idle_mib']:,.0f}"),
        ("RSS after one update each MiB", lambda m: f"{m['rss_after_mib']:,.0f}"),
        ("peak RSS MiB", lambda m: f"{m['peak_rss_mib']:,.0f}"),
    ]
    return column_table(columns, memory)


def _merge_section(merges: list[dict[str, Any]] | None) -> str:
    """The gateway merge times (absent from runs before they were measured)."""
    if not merges:
        return ""
    methods = list(merges[0]["seconds"])
    columns: list[Column] = [
        ("adapter", lambda m: m["model"]),
        ("experts", lambda m: m["experts"]),
        *[(f"{name} s", lambda m, n=name: f"{m['seconds'][n]:.2f}") for name in methods],
    ]
    rows = [m for m in merges if "layer0_svd" in m]
    reference = [
        [
            m["model"],
            m["layer0_svd"]["pairs"],
            f"{m['layer0_svd']['factored_seconds']:.3f}",
            f"{m['layer0_svd']['product_seconds']:.2f}",
            f"{m['layer0_svd']['product_seconds'] / m['layer0_svd']['factored_seconds']:.0f}x",
            f"{m['layer0_svd']['max_abs_difference']:.1e}",
        ]
        for m in rows
    ]
    headers = [
        "adapter",
        "pairs",
        "factored s",
        "full product s",
        "speed-up",
        "products apart (relative)",
    ]
    return f"""### The gateway, merged on request

`GatewayMerge.merge` (what a download of the gateway runs first) over {merges[0]["experts"]}
experts of each size, float32, in the benchmark's process. The `svd` merge refactorises
Σ_k w_k·B_k·A_k at rank r through QR of the stacked factors and the SVD of their small core;
on layer 0 it is timed against the SVD of each full out×in product (the same best rank-r
fit; the last column compares the two merged products):

{column_table(columns, merges)}

{markdown_table(headers, reference)}
"""


def _crowd_table(c: dict[str, Any]) -> str:
    row = [
        f"{c['workers']} on {c['experts']} experts",
        f"{c['seconds']:g} s",
        f"one per {c['interval']:g} s each ({c['offered_rate']:.1f}/s)",
        c["acks"],
        f"{c['rate']:.2f}",
        ms(c["p50_ms"]),
        ms(c["p99_ms"]),
        ms(c["max_ms"]),
        c["errors"],
        f"{c['ledger']['accepted_rows']} / {c['ledger']['missing']}",
        "PASS" if c["ok"] else "FAIL",
    ]
    headers = [
        "workers",
        "for",
        "uploads",
        "acks",
        "acks/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "ledger rows / acks missing",
        "no lost update",
    ]
    return markdown_table(headers, [row])


def _bytes_text(s: dict[str, Any]) -> str:
    sole, peer = s["sync"], s.get("sync_with_peer")
    text = (
        f"{s['size']}: {_mb(sole['payload_bytes_up_per_sync'])} up "
        f"(delta {_mb(s['bf16_body_bytes'])}), {_mb(sole['payload_bytes_down_per_sync'])} down"
    )
    if peer is not None:
        extra = (peer["payload_bytes_down_per_sync"] - s["bf16_body_bytes"]) / 1024
        text += f" sole, {_mb(peer['payload_bytes_down_per_sync'])} with a peer"
        text += f" (the delta {extra:+.1f} KB of container header)"
    return text


def _goals(v: dict[str, Any]) -> str:
    sizes = {s["size"]: s for s in v["sizes"]}
    big = sizes["7B"]["sync"]
    thirty = [m for m in v["memory"] if m["experts"] == 30]
    memory = (
        f"{thirty[0]['peak_rss_mib']:,.0f} MiB peak"
        if thirty
        else "not measured (fewer experts in this run)"
    )
    memory_ok = bool(thirty) and thirty[0]["peak_rss_mib"] <= MEMORY_GOAL_MIB
    acks = ", ".join(f"{sizes[s]['ack']['ratio']:.2f}x ({s})" for s in ACK_GOAL_SIZES if s in sizes)
    ack_ok = all(sizes[s]["ack"]["ratio"] <= ACK_GOAL for s in ACK_GOAL_SIZES if s in sizes)
    bytes_text = "; ".join(_bytes_text(s) for s in v["sizes"])
    rows: list[list[object]] = [
        [
            f"time blocked ≤ {BLOCKED_GOAL:.0%} of training, 7B, {v['plan']['interval']:g} s interval",
            f"{big['blocked_share']:.2%} ({1e3 * big['blocked_seconds_per_sync']:.0f} ms / sync, "
            f"{1e3 * big['blocked_cpu_seconds_per_sync']:.0f} ms of it CPU)",
            _met(big["blocked_share"] <= BLOCKED_GOAL),
        ],
        [
            "bytes per sync ≤ one bf16 delta up and one down, nothing down for a sole worker (payload)",
            bytes_text,
            _met(all(_bytes_ok(s) for s in v["sizes"])),
        ],
        [f"acknowledgement ≤ {ACK_GOAL:g}× the FLOOR (17.6 MB, 80.8 MB)", acks, _met(ack_ok)],
        [
            f"coordinator memory, 30 experts of 0.5B size ≤ {MEMORY_GOAL_MIB / 1024:g} GB",
            memory,
            _met(memory_ok),
        ],
    ]
    return markdown_table(["goal (issue 13)", "measured", ""], rows)


def _crowd_note(c: dict[str, Any]) -> str:
    if c["rate"] >= 0.9 * c["offered_rate"]:
        return "The coordinator kept up with the offered load."
    return (
        f"The coordinator acknowledged {c['rate']:.2f} updates/s of the {c['offered_rate']:.1f}/s "
        "offered: on this machine it is saturated, so these latencies are mostly queueing "
        "(uploads wait for the expert's lock and for a CPU)."
    )


def render(v: dict[str, Any]) -> str:
    """The goals, then each part's table."""
    plan, link, crowd = v["plan"], v["link"], v["crowd"]
    return f"""
Adapters with the exact LoRA shapes of Qwen2.5-0.5B, 1.5B and 7B (r={v["rank"]} on q, k, v,
o, gate, up and down_proj; shapes from the published configs; random values, no model)
on a real coordinator process (`open_coordinator` with a synthetic initial adapter). A
shared machine ({v["cpu_count"]} cores, at times other engineers' jobs; this run under `nice
{v["niceness"]}`, load average {loads(v["load_before"])} before and
{loads(v["load_after"])} after), so wall times are inflated by waiting for a CPU; the
CPU column says how much of the blocked time was the training thread's own work (the
snapshot and the rebase give half their tensors to a helper thread, whose CPU time is not
in that column). This
run took {v.get("elapsed_seconds", 0) / 60:.1f} minutes.

{_goals(v)}

### Sync over a shaped 1 Gbit/s link, 20 ms round trip

The worker's real `Syncer` (background mode, bf16 uploads) and `CoordinatorClient`, through
`benchmarks.shaped_link` ({8 * link["rate_bytes"] / 1e9:g} Gbit/s each way by token bucket,
{1e3 * link["rtt_seconds"]:g} ms round trip) to the coordinator: first as the sole worker
of one expert, then on another expert with a peer that uploads to it (straight to the
coordinator) halfway between its syncs, so that every sync must also bring the peer's
update down. A training step sleeps {plan["step"]:g} s (the accelerator's share) and then
moves every tensor; a sync is due every {plan["interval"]:g} s on the boundaries of the wall
clock, with a fifth of that to wait for the round's other update before the pull, as
`fedmoe worker` does by default (`--align-syncs`, `--pull-wait`). Wire bytes are what crossed the link
(HTTP headers and the acknowledgement's JSON included). Blocked = `WorkerStats.blocked_seconds`:
the snapshot when a sync starts (a copy into buffers allocated once, at start-up) and the
rebase at the step that collects it ((local − snapshot) + newest, in place, tensor by
tensor), both in host memory here (`fedmoe.worker.slots.TensorSlot`); on a GPU the worker's
`PeftAdapterSlot` makes the snapshot with one device-to-host copy per tensor and rebases on
the device after copying the snapshot and the new expert there. "In flight" is from the
start of a sync to the step boundary that collected it.

{_sync_table(v["sizes"])}

### Acknowledgement latency against the FLOOR

Sequential uploads of each size's bf16 delta straight to the coordinator on loopback (no
shaping), each followed by the same bytes to the FLOOR: the same FastAPI + uvicorn stack
reading the body and appending it to one file with a single `fsync`; one warm-up upload to
each first, not counted; 0.2 s between uploads, off the clock, so that each finds both
servers idle. Beyond that the coordinator, while the body arrives, hashes it
(BLAKE3, a helper thread) and receives it into one buffer (private memory in huge pages
where the kernel allows), which it keeps as the body, not a copy. After the last byte it
takes the expert's lock and writes the body into the log where its record will lie and
flushes it (a helper thread) while two threads convert the tensors to float32 with their
float64 norm (the finiteness check) and the default update screen judges the upload (the
sync runs before left two workers' history) and computes θ + w·Δ (the peer counts as
active, so each upload opens a FedAvg round that the next one ends: the expert before it
and the delta are kept meanwhile); then it writes the record's header in front of the body
and fsyncs, commits the ledger row (SQLite, no fsync of its own), hashes the new expert
for `state_sha256` (XXH3-128, beside the log's fsync) and answers JSON. The screen's
direction average takes the new direction after the answer (the next upload waits for
it). Per-update phase timings:
`fedmoe.coordinator.phases` at DEBUG (`python -m benchmarks._realsize_server --log-phases`).
The CPU column is each server process's CPU time (all threads, user + system) over the
uploads, per upload: what the coordinator validates, applies and hashes beyond the FLOOR's
receive and write, on cores the client shares. Uploads alternate one by one here; the `ack-latency` section (`coordinator_bench`) measures
each server in blocks of 10 s instead, with a sole worker: read both, the FLOOR's own time
moves by half between runs on this machine.

{_ack_table(v["sizes"])}

### Coordinator memory (0.5B-sized experts)

A coordinator process with N experts, after one bf16 update to each; nobody downloads the
merged gateway, which is built only on request (`--eager-gateway` off, the default).

{_memory_table(v["memory"])}

{_merge_section(v.get("merges"))}
### 30 workers, 0.5B-sized adapters

{crowd["workers"]} workers in {crowd["procs"]} `benchmarks._load` processes, each uploading a
0.5B-sized bf16 delta once per {crowd["interval"]:g} s (first upload at a random point of the
first interval) for {crowd["seconds"]:g} s, on loopback; then every acknowledgement is looked
up in the ledger and each expert's version must equal its accepted count with versions
1..n acknowledged exactly once.

{_crowd_table(crowd)}

{_crowd_note(crowd)}
"""
