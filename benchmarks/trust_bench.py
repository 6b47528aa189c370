"""Trust between parties (issue 16): DP-SGD's cost in quality and speed, and poisoning
workers against the default and the robust strategies.

Run: ``.venv/bin/python -m benchmarks.trust_bench [--quick]``.

Part 1 trains one SQL expert locally (the worker's real ``LocalTrainer`` and, with DP,
its ``PrivateTrainer``) for the same number of steps (equal expected tokens: Poisson
batches have the batch size as their mean) at ε ∈ {∞, 8, 4, 1}, δ = 1/n; the noise is
derived from the budget over those steps. Part 2 runs real coordinators and real worker
jobs over HTTP: per strategy, five SQL experts with 4 workers each, 3 honest and one more:
honest (the clean run), ×100, sign flip, trained on backdoored data, or the stealthy
backdoor (a clean/backdoored mix, its delta scaled to the honest updates' median norm,
which it is given: a generous assumption for the attacker).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.attackers import (
    ExpertScorer,
    backdoor_records,
    run_worker,
    sql_shards,
    stealth_records,
    write_jsonl,
)
from benchmarks.common import parser, setup_torch
from benchmarks.report import publish
from fedmoe.batching import tokenize_examples
from fedmoe.client import CoordinatorClient
from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.data import parse_record
from fedmoe.demo_data import generate_domain
from fedmoe.evaluation import validation_loss
from fedmoe.modeling import attach_lora, load_base_model
from fedmoe.procs import start_coordinator, stop
from fedmoe.worker.privacy import build_trainer

TITLE = "Trust: differential privacy and poisoning workers (issue 16)"
EPSILONS: list[float | None] = [None, 8.0, 4.0, 1.0]
KINDS = ("clean", "scale", "flip", "backdoor", "stealth")
HARDER = {"max_steps": 4, "learning_rate": 0.05, "batch_size": 2}  # the backdoor's owner
STRATEGIES: dict[str, list[str]] = {
    "async, no screen": ["--no-screen-updates"],
    "async + update screen (default)": [],
    "fedbuff K=4, mean": ["--strategy", "fedbuff", "--buffer-size", "4"],
    "fedbuff K=4, median + outlier test": [
        *("--strategy", "fedbuff", "--buffer-size", "4", "--robust-aggregation", "median"),
        "--outlier-test",
    ],
    "fedbuff K=4, trimmed mean 0.25 + outlier test": [
        *("--strategy", "fedbuff", "--buffer-size", "4", "--robust-aggregation", "trimmed_mean"),
        *("--trim-fraction", "0.25", "--outlier-test"),
    ],
}


def dp_arm(epsilon: float | None, steps: int, train_count: int) -> dict[str, float]:
    """Train one expert locally for ``steps`` steps (DP-SGD at ``epsilon``); loss and speed."""
    torch.manual_seed(0)
    base = load_base_model("tiny", device="cpu")
    model = attach_lora(base.model, LoraSettings())
    rows = generate_domain("sql_expert", train_count + 40, seed=11)
    examples = [parse_record(r) for r in rows]
    train = tokenize_examples(examples[:train_count], base.tokenizer, max_length=160)
    held_out = tokenize_examples(examples[train_count:], base.tokenizer, max_length=160)
    dp = {} if epsilon is None else {"dp_epsilon": epsilon, "dp_delta": 1.0 / len(train)}
    settings = TrainSettings(batch_size=4, max_length=160, **dp)
    trainer = build_trainer(
        model,
        train,
        settings,
        planned_steps=steps,
        pad_token_id=base.tokenizer.pad_token_id,
        device=torch.device("cpu"),
        learning_rate=0.01,
    )
    began, tokens = time.perf_counter(), 0
    for _ in range(steps):
        tokens += trainer.step().tokens
    seconds = time.perf_counter() - began
    spent = getattr(trainer, "spent_epsilon", lambda: None)()
    sigma = getattr(getattr(trainer, "privacy", None), "noise_multiplier", 0.0)
    return {
        "loss": validation_loss(model, held_out, pad_token_id=base.tokenizer.pad_token_id),
        "step_seconds": seconds / steps,
        "tokens": tokens,
        "spent_epsilon": spent,
        "noise_multiplier": sigma,
    }


def federation(
    root: Path, flags: list[str], data: dict[str, Path], steps: int
) -> dict[str, dict[str, Any]]:
    """One coordinator process, four experts, 4 real workers each; the experts' states."""
    experts = ",".join(f"{kind}_expert" for kind in KINDS)
    process, url = start_coordinator(
        root / "state", root / "coordinator.log", "--experts", experts, *flags
    )
    try:
        for kind in KINDS:
            expert = f"{kind}_expert"
            for index in range(3):
                run_worker(
                    url, f"{kind}-honest-{index}", expert, data[f"honest{index}"], max_steps=steps
                )
            run_worker(url, f"{kind}-fourth", expert, **fourth(url, kind, data, steps))
        with CoordinatorClient(url) as client:
            shapes = {k: tuple(v) for k, v in client.schema().tensors.items()}
            states = {kind: client.expert_adapter(f"{kind}_expert", shapes)[1] for kind in KINDS}
            rows = [row for row in client.ledger() if row.verdict is not None]
    finally:
        stop(process)
    verdicts = {row.worker_id: row.verdict for row in rows}
    reasons = {row.worker_id: row.reason for row in rows}
    return {"states": states, "verdicts": verdicts, "reasons": reasons}


def fourth(url: str, kind: str, data: dict[str, Path], steps: int) -> dict[str, Any]:
    """The fourth worker's dataset and options: honest, or the attacker ``kind``."""
    if kind in ("scale", "flip"):
        return {"dataset": data["honest3"], "attack": kind, "max_steps": steps}
    if kind == "backdoor":
        return {"dataset": data["backdoor"], **HARDER}
    if kind == "stealth":  # scaled to the median norm of the honest uploads before it
        with CoordinatorClient(url) as client:
            norms = [r.update_norm for r in client.ledger() if r.expert == "stealth_expert"]
        return {"dataset": data["stealth"], "target_norm": statistics.median(norms), **HARDER}
    return {"dataset": data["honest3"], "max_steps": steps}


def robustness(root: Path, steps: int, only: list[str]) -> dict[str, Any]:
    """Every strategy against every attacker; losses, backdoor success, verdicts."""
    data_dir = root / "data"
    data_dir.mkdir()
    shards = sql_shards(data_dir, 4, 8, seed=5)
    data = {f"honest{i}": path for i, path in enumerate(shards)}
    data["backdoor"] = write_jsonl(data_dir / "backdoor.jsonl", backdoor_records(8, seed=6))
    data["stealth"] = write_jsonl(data_dir / "stealth.jsonl", stealth_records(8, seed=6))
    scorer = ExpertScorer(count=16)
    results: dict[str, Any] = {}
    for index, (label, flags) in enumerate(STRATEGIES.items()):
        if only and not any(word in label for word in only):
            continue
        run = federation(root / f"arm{index}", flags, data, steps)
        results[label] = {
            "loss": {k: scorer.losses(s)[0] for k, s in run["states"].items()},
            "trigger_loss": {k: scorer.losses(s)[1] for k, s in run["states"].items()},
            "backdoor_success": {k: scorer.backdoor_success(s) for k, s in run["states"].items()},
            "verdicts": run["verdicts"],
            "reasons": run["reasons"],
        }
    return results


def main() -> None:
    """Both parts; JSON for RESULTS.md."""
    flags = parser(__doc__.splitlines()[0])
    flags.add_argument(
        "--only",
        action="append",
        default=[],
        help="Run only the strategies whose label contains this word (repeatable), and "
        "skip the DP part: for trying a strategy out, not for --write.",
    )
    args = flags.parse_args()
    setup_torch()
    started, load = time.monotonic(), list(os.getloadavg())
    steps, count = (20, 64) if args.quick else (200, 400)
    privacy = {}
    if not args.only:
        privacy = {("inf" if e is None else f"{e:g}"): dp_arm(e, steps, count) for e in EPSILONS}
    with tempfile.TemporaryDirectory(prefix="trust-bench-") as tmp:
        robust = robustness(Path(tmp), 3 if args.quick else 10, args.only)
    values = {
        "quick": args.quick,
        "dp_steps": steps,
        "dp_train_examples": count,
        "privacy": privacy,
        "robustness": robust,
        "seconds": time.monotonic() - started,
        "load_before": load,
    }
    publish("trust", TITLE, values, args)


if __name__ == "__main__":
    main()
