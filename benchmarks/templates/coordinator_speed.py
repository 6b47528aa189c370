"""``coordinator-speed``: per-update cost against the FLOOR, phases, the gateway, memory."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import loads, markdown_table, ms

SEQUENTIAL = ["adapter", "params", "bf16 body", "uploads", "coordinator p50 ms",
              "coordinator p90 ms", "FLOOR p50 ms", "FLOOR HTTP-only p50 ms",
              "coordinator / FLOOR"]  # fmt: skip
THROUGHPUT = ["adapter", "clients", "coordinator upd/s", "FLOOR upd/s", "coordinator / FLOOR",
              "coordinator p50 ms", "FLOOR p50 ms", "errors"]  # fmt: skip
GATEWAY = ["adapter", "experts", "gateway rank", "gateway file", "cat merge ms", "encode ms",
           "write ms", "total per rebuild ms"]  # fmt: skip
MEMORY = ["experts", "gateway", "updates", "update p50 ms", "update p90 ms", "update max ms",
          "GET gateway ms", "gateway MB (rank)", "RSS idle MiB", "RSS after updates MiB",
          "peak RSS after updates MiB", "peak RSS incl. gateway GET MiB",
          "state dir MB"]  # fmt: skip
# How the phase table was measured: "copied-steps" (runs up to fdf0394: the steps of
# ``_apply`` re-run one by one in the benchmark) or "instrumented" (the real update path,
# timed by its own phase hooks).
PHASES_METHOD = {
    "copied-steps": """Each step of `CentralCoordinator._apply` timed in a worker thread of this process (as the
server runs them in anyio's threadpool), interleaved, median of
{tiny} / {qwen}; then an in-process `submit_update` (no HTTP),
whose total also pays for the gateway rebuild the store's writer thread does meanwhile:""",
    "instrumented": """Each phase of the real update path: `CentralCoordinator.submit_update` on a coordinator
opened by the product's `open_coordinator`, its methods timed in place by
`benchmarks._breakdown.PhaseTimer` (wrappers on the live instance, no copy of the code), in a
worker thread of this process (as the server runs updates in anyio's threadpool), median of
{tiny} / {qwen} updates; a row excludes the timed methods it calls, and the total is the
whole `submit_update` (no HTTP):""",
}


def _tables(v: dict[str, Any]) -> dict[str, str]:
    sequential = [
        [r["adapter"], f"{r['params'] / 1e6:.3f} M", f"{r['body_bytes'] / 1e6:.2f} MB",
         r["uploads"], ms(r["coordinator_p50_ms"]), ms(r["coordinator_p90_ms"]),
         ms(r["floor_p50_ms"]), ms(r["floor_http_only_p50_ms"]), f"{r['ratio']:.2f}x"]
        for r in v["sequential"]
    ]  # fmt: skip
    throughput = [
        [r["adapter"], r["clients"], f"{r['coordinator_rate']:.1f}", f"{r['floor_rate']:.1f}",
         f"{r['ratio']:.2f}", ms(r["coordinator_p50_ms"]), ms(r["floor_p50_ms"]), r["errors"]]
        for r in v["throughput"]
    ]  # fmt: skip
    phases = [[p["step"], ms(p["tiny_ms"]), ms(p["qwen_ms"])] for p in v["phases"]]
    gateway = [
        [g["adapter"], g["experts"], g["rank"], f"{g['bytes'] / 1e6:,.1f} MB", ms(g["merge_ms"]),
         ms(g["encode_ms"]), ms(g["write_ms"]), ms(g["total_ms"])]
        for g in v["gateway"]
    ]  # fmt: skip
    memory = [
        [m["experts"], m["merge_method"], m["updates"], ms(m["p50_ms"]), ms(m["p90_ms"]),
         ms(m["max_ms"]), ms(m["gateway_get_ms"]),
         f"{m['gateway_bytes'] / 1e6:,.0f} ({m['gateway_rank']})", f"{m['rss_start']:,.0f}",
         f"{m['rss_after_updates']:,.0f}", f"{m['hwm_after_updates']:,.0f}", f"{m['hwm']:,.0f}",
         f"{m['state_bytes'] / 1e6:,.0f}"]
        for m in v["memory"]
    ]  # fmt: skip
    return {
        "sequential": markdown_table(SEQUENTIAL, sequential),
        "throughput": markdown_table(THROUGHPUT, throughput),
        "phases": markdown_table(["step (in-process, median)", "tiny ms", "Qwen-shape ms"], phases),
        "gateway": markdown_table(GATEWAY, gateway),
        "memory": markdown_table(MEMORY, memory),
    }


def _scaling(v: dict[str, Any]) -> str:
    """What going from 3 to many experts costs, from the gateway and memory tables."""
    many = v["many_experts"]
    runs = {(m["experts"], m["merge_method"]): m for m in v["memory"]}
    m3, m_many, lin = runs[(3, "cat")], runs[(many, "cat")], runs[(many, "linear")]
    g = v["gateway"][-1]
    return f"""At {many} experts the `cat` gateway is {g["bytes"] / 1e6:,.1f} MB (rank {g["rank"]}) and one rebuild
costs {ms(g["total_ms"])} ms of CPU and disk in this process (merge {ms(g["merge_ms"])} + encode
{ms(g["encode_ms"])} + write {ms(g["write_ms"])} ms), paid at most once per `--gateway-file-interval`
(5 s) in the background, and by the first `GET` of a new version. In the coordinator
process, going from 3 to {many} experts with `cat` takes peak RSS from
{m3["hwm"]:,.0f} to {m_many["hwm"]:,.0f} MiB, the median sequential update from
{ms(m3["p50_ms"])} to {ms(m_many["p50_ms"])} ms (p90 {ms(m3["p90_ms"])} → {ms(m_many["p90_ms"])} ms)
and one gateway download from {ms(m3["gateway_get_ms"])} to
{ms(m_many["gateway_get_ms"])} ms; the same {many} experts with `merge_method=linear`
(a rank-r gateway) peak at {lin["hwm"]:,.0f} MiB with a median update of
{ms(lin["p50_ms"])} ms and a {ms(lin["gateway_get_ms"])} ms download."""


def render(v: dict[str, Any]) -> str:
    """The section body."""
    t = _tables(v)
    before = loads(v["load_before"], " / ", brackets=False)
    after = loads(v["load_after"], " / ", brackets=False)
    seq, secs, rep = v["min_sequential"], v["speed_seconds"], v["repeat"]
    return f"""
Machine load average (1/5/15 min): {before} before, {after} after.
Coordinator and FLOOR are both one uvicorn process (access log on), started side by
side; each measurement on the coordinator is followed at once by the same one on the
FLOOR. FLOOR = FastAPI endpoint that reads the same body over loopback HTTP and writes
it with temp file + fsync + rename + directory fsync (`fedmoe.adapters.atomic_write`);
"HTTP-only" skips the write. The coordinator does more durable I/O than the FLOOR by
design: its expert file is float32 (2× the bf16 body) and the SQLite WAL commit is a
second fsync. Sequential = one client, uploads back to back (at least
{seq["tiny"]} / {seq["qwen"]}); throughput runs last
{secs["tiny"]:g} s / {secs["qwen"]:g} s per point, clients as
separate processes, 3 experts.

### One update, sequential

{t["sequential"]}

### Throughput

{t["throughput"]}

Coordinator peak RSS (VmHWM) after these runs, concurrent uploads included: tiny
{v["peak_rss_mib"]["tiny"]:,.0f} MiB, Qwen-shaped (3 experts)
{v["peak_rss_mib"]["qwen"]:,.0f} MiB.

### Where the time goes in one update

{PHASES_METHOD[v["phases_source"]].format(tiny=rep["tiny"], qwen=rep["qwen"])}

{t["phases"]}

### The `cat` gateway

With `merge_method=cat` (the default) the gateway has rank r × experts, so its size grows
linearly with the number of experts. API reads merge the newest version on demand; the
file `gateway.safetensors` (for operators) is rewritten by the store's background thread
with the newest version at most every `--gateway-file-interval` seconds (default 5), so a
full rebuild (merge + encode + fsync'd write) costs at most once per interval, not per update.

{t["gateway"]}

### Memory (Qwen-shaped experts, separate coordinator process)

Peak RSS (`VmHWM` of `/proc/PID/status`) after {v["memory_updates"]} sequential update(s)
to each expert, then after one `GET /v1/gateway/adapter`:

{t["memory"]}

{_scaling(v)}
"""
