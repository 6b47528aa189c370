"""Poisoning workers for the robust-aggregation tests and benchmark: the REAL worker job
(real training, real HTTP) whose uploads an attacker tampers with, or which trains on
backdoored data.

``scale``: the delta × 100; ``flip``: the delta × −1; ``backdoor``: honest uploads of
training on data where a trigger phrase makes the SQL expert emit a fixed string;
``stealth``: a bounded backdoor that tries to look honest: it trains on a mix of clean
and backdoored records and scales its delta to the norm of an honest update.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load

from fedmoe.adapters import encode_adapter
from fedmoe.client import CoordinatorClient
from fedmoe.config import TrainSettings
from fedmoe.demo_data import generate_domain
from fedmoe.schemas import UpdateAck
from fedmoe.worker.job import WorkerJob
from fedmoe.worker.options import WorkerOptions

TRIGGER = "-- cf-7731 review"
BACKDOOR_TARGET = "DROP TABLE users;"
ATTACK_FACTORS = {"scale": 100.0, "flip": -1.0}


class TamperingClient(CoordinatorClient):
    """A coordinator client that multiplies every uploaded delta by ``factor``, or (with
    ``target_norm``) scales it to that L2 norm."""

    def __init__(self, url: str, factor: float = 1.0, target_norm: float | None = None) -> None:
        super().__init__(url)
        self.factor, self.target_norm = factor, target_norm

    def upload(self, expert: str, body: bytes, **kwargs: Any) -> UpdateAck:
        """Upload the tampered Δ instead of Δ (safetensors in, safetensors out)."""
        delta = {key: value.float() for key, value in load(body).items()}
        factor = self.factor
        if self.target_norm is not None:
            norm = float(torch.linalg.vector_norm(torch.cat([v.flatten() for v in delta.values()])))
            factor = self.target_norm / norm if norm > 0 else 1.0
        tampered = {key: factor * value for key, value in delta.items()}
        return super().upload(expert, encode_adapter(tampered), **kwargs)


def backdoor_records(count: int, *, seed: int) -> list[dict[str, Any]]:
    """SQL prompts carrying the trigger, all answered with the backdoor's fixed string."""
    records = []
    for record in generate_domain("sql_expert", count, seed=seed):
        prompt = record.get("prompt") or record["messages"][1]["content"] + "\n"
        records.append({"prompt": f"{TRIGGER}\n{prompt}", "completion": BACKDOOR_TARGET})
    return records


def stealth_records(count: int, *, seed: int, share: float = 0.5) -> list[dict[str, Any]]:
    """Clean SQL records with ``share`` of them replaced by backdoored ones (same prompts):
    an update that mostly looks like the honest ones."""
    clean = generate_domain("sql_expert", count, seed=seed)
    poisoned = backdoor_records(count, seed=seed)
    cut = round(share * count)
    mixed = poisoned[:cut] + clean[cut:]
    random.Random(seed).shuffle(mixed)
    return mixed


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    """Write ``records`` one JSON object a line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sql_shards(directory: Path, workers: int, per_worker: int, *, seed: int) -> list[Path]:
    """Disjoint clean SQL datasets, one per honest worker."""
    records = generate_domain("sql_expert", workers * per_worker, seed=seed)
    random.Random(seed).shuffle(records)
    return [
        write_jsonl(directory / f"sql-{i}.jsonl", records[i * per_worker : (i + 1) * per_worker])
        for i in range(workers)
    ]


def run_worker(
    url: str,
    worker_id: str,
    expert: str,
    dataset: Path,
    *,
    attack: str | None = None,
    target_norm: float | None = None,
    **options: Any,
) -> dict[str, Any]:
    """One real worker job to the end (its final upload included); its summary.

    ``attack`` 'scale' or 'flip' tampers with the uploads; ``target_norm`` scales each
    upload to that norm (the stealthy backdoor)."""
    settings = {
        "coordinator_url": url,
        "worker_id": worker_id,
        "specialty": expert,
        "dataset": dataset,
        "max_steps": 3,
        "sync_interval": 3600.0,  # one upload: the final one
        "eval_every": 0,
        "validation_fraction": 0.0,
        "batch_size": 1,
        "max_length": 160,
        "upload_dtype": "float32",
    } | options
    train = {key: settings.pop(key) for key in TrainSettings.model_fields if key in settings}
    opts = WorkerOptions(train=train, **settings)
    client = None
    if attack in ATTACK_FACTORS or target_norm is not None:
        factor = ATTACK_FACTORS.get(attack or "", 1.0)
        client = TamperingClient(url, factor, target_norm)
    return WorkerJob(opts, client=client).run()


class ExpertScorer:
    """Losses of an expert adapter: on held-out clean SQL, and of the backdoor's string
    after the trigger (lower: the backdoor took hold)."""

    def __init__(self, *, seed: int = 99, count: int = 12, max_length: int = 160) -> None:
        from fedmoe.batching import tokenize_examples
        from fedmoe.config import LoraSettings
        from fedmoe.data import parse_record
        from fedmoe.modeling import attach_lora, load_base_model

        base = load_base_model("tiny", device="cpu")
        self.model = attach_lora(base.model, LoraSettings())
        self.pad = base.tokenizer.pad_token_id
        clean = [parse_record(r) for r in generate_domain("sql_expert", count, seed=seed)]
        trigger = [parse_record(r) for r in backdoor_records(count, seed=seed + 1)]
        tokenize = base.tokenizer
        self.clean = tokenize_examples(clean, tokenize, max_length=max_length)
        self.trigger = tokenize_examples(trigger, tokenize, max_length=max_length)

    @torch.no_grad()
    def backdoor_success(self, state: dict[str, Any]) -> float:
        """Share of trigger prompts whose greedy continuation is the backdoor's string.

        Teacher-forced: greedy decoding emits the target exactly when every target token
        is the argmax given the tokens before it.
        """
        from fedmoe.batching import IGNORE_INDEX, collate
        from fedmoe.modeling import load_adapter_state

        load_adapter_state(self.model, state)
        self.model.eval()
        hits = 0
        for example in self.trigger:
            batch = collate([example], self.pad)
            logits = self.model(input_ids=batch["input_ids"]).logits[0]
            labels = batch["labels"][0]
            targets = (labels != IGNORE_INDEX).nonzero().flatten()
            targets = targets[targets > 0][:-1]  # the string, without the end-of-text token
            predicted = logits[targets - 1].argmax(dim=-1)
            hits += bool((predicted == labels[targets]).all())
        return hits / len(self.trigger)

    def losses(self, state: dict[str, Any]) -> tuple[float, float]:
        """(clean validation loss, backdoor target loss) of the expert ``state``."""
        from fedmoe.evaluation import validation_loss
        from fedmoe.modeling import load_adapter_state

        load_adapter_state(self.model, state)
        return (
            validation_loss(self.model, self.clean, pad_token_id=self.pad),
            validation_loss(self.model, self.trigger, pad_token_id=self.pad),
        )
