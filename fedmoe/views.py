"""Rich renderings for the CLI: coordinator status and the demo's results."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Column, Table

from fedmoe.schemas import StatusInfo, StrategyStatus


def strategy_summary(strategy: StrategyStatus | None) -> str:
    """One cell: the rule, η, and what it holds now (a FedBuff buffer, an open round)."""
    if strategy is None:
        return ""
    lr = strategy.server_lr
    parts = [strategy.strategy, f"η {lr:g}" if isinstance(lr, float) else f"η {lr}"]
    if strategy.optimizer != "sgd" or strategy.momentum:
        parts.append(f"{strategy.optimizer} {strategy.momentum:g}")
    if strategy.buffer_size is not None:
        parts.append(f"buffer {strategy.buffer_fill}/{strategy.buffer_size}")
    if strategy.round_fill:
        parts.append(f"round: {strategy.round_fill} in")
    return " ".join(parts)


def print_status(console: Console, data: StatusInfo) -> None:
    """Experts, gateway and workers from ``GET /v1/status`` as tables."""
    console.print(f"[bold]base model[/] {data.base_model}  {data.base_model_fingerprint}")
    console.print(f"[bold]LoRA[/] {data.lora_config.model_dump()}")
    experts = Table(
        Column("expert", overflow="fold", min_width=_widest(data.experts)),
        "version",
        "applied",
        "rejected",
        Column("strategy", overflow="fold"),
        Column("workers", overflow="fold"),
        title="experts",
    )
    for name, e in data.experts.items():
        experts.add_row(
            name,
            str(e.version),
            str(e.updates_applied),
            str(e.updates_rejected),
            strategy_summary(e.strategy),
            ", ".join(e.workers),
        )
    console.print(experts)
    g = data.gateway
    console.print(
        f"[bold]gateway[/] v{g.version} merge={g.merge_method} "
        f"rank={g.lora_rank} weights={g.weights} from={g.expert_versions}"
    )
    shown = len(data.workers)
    page = "" if shown == data.workers_total else f", {shown} of {data.workers_total} shown"
    workers = Table(
        # ids are copied into stop_worker.sh and the like: wrap them, never cut them
        Column("worker", overflow="fold", min_width=_widest(data.workers)),
        Column("specialty", overflow="fold", min_width=_widest(data.experts)),
        "updates",
        "tokens",
        "loss",
        "τ",
        "ε",
        "seen",
        title=f"workers (loss, staleness τ and spent DP ε of the last update{page})",
    )
    for wid, w in data.workers.items():
        loss = "" if w.last_train_loss is None else f"{w.last_train_loss:.4f}"
        workers.add_row(
            wid,
            w.specialty,
            str(w.updates),
            str(w.tokens),
            loss,
            str(w.last_staleness if w.last_staleness is not None else ""),
            "" if w.dp_epsilon is None else f"{w.dp_epsilon:.3g}",
            f"{time.time() - w.last_seen:.0f}s ago",
        )
    console.print(workers)


def _widest(names: Iterable[str], cap: int = 32) -> int:
    return min(cap, max((len(name) for name in names), default=0))


def print_loss_table(console: Console, table: dict[str, dict[str, float]]) -> None:
    """Validation loss per model (rows) and domain (columns), with the mean."""
    domains = list(table["base"])
    view = Table("model", *domains, "mean", title="validation loss (lower is better)")
    for name, row in table.items():
        mean = sum(row.values()) / len(row)
        view.add_row(name, *(f"{row[d]:.4f}" for d in domains), f"{mean:.4f}")
    console.print(view)


def print_worker_summaries(console: Console, summaries: Iterable[dict[str, Any]]) -> None:
    """One line per worker: steps, speed, uploads and time blocked on synchronisation."""
    for s in summaries:
        console.print(
            f"{s['worker_id']}: {s['steps']} steps, {s['tokens_per_second']:.0f} "
            f"tok/s, {s['uploads']} uploads, blocked {100 * s['blocked_share']:.1f}%"
        )


def print_verdicts(console: Console, claims: Iterable[tuple[str, bool]]) -> None:
    """Each claim the demo checks, with yes / NO."""
    for claim, holds in claims:
        console.print(f"  {'[green]yes[/]' if holds else '[red]NO[/]'}  {claim}")


def print_router(console: Console, router: dict[str, Any] | None) -> None:
    """How prompts are routed (``router`` of ``GET /v1/gateway``), in one or two lines."""
    if not router:
        return
    experts = router.get("experts") or {}
    if not experts:
        console.print("router: no domain signatures yet, prompts use the merged gateway")
        return
    covered = ", ".join(f"{name} ({info['count']} examples)" for name, info in experts.items())
    console.print(
        f"router: {router['method']}, margin {router['margin']}, fallback "
        f"{router['fallback']}; signatures: {covered}"
    )
    old = [name for name, info in experts.items() if info.get("format", 1) < 2]
    if old and router.get("ood_factor"):
        console.print(
            f"  format 1 signatures (older workers; no out-of-domain test): {', '.join(old)}"
        )
    if router.get("missing"):
        console.print(f"  no signature yet (always fallback): {', '.join(router['missing'])}")


def print_routing_accuracy(console: Console, accuracy: dict[str, float]) -> None:
    """The demo's routing line: share of held-out prompts sent to their own domain's expert."""
    if not accuracy:
        console.print("routing: no domain signatures, so no routed gateway row")
        return
    overall = sum(accuracy.values()) / len(accuracy)
    parts = ", ".join(f"{name} {100 * share:.0f}%" for name, share in accuracy.items())
    console.print(
        f"routing accuracy (held-out prompts to their own expert): {100 * overall:.1f}% ({parts})"
    )
