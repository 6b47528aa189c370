"""Shared benchmark helpers: CPU setup, command line, demo domains and evaluation.

The virtual-clock federation simulator is in ``benchmarks.simulation``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel

from benchmarks.report import add_output_flags
from fedmoe.aggregate import AdapterState
from fedmoe.batching import TokenizedExample, tokenize_examples
from fedmoe.config import LoraSettings
from fedmoe.data import load_examples
from fedmoe.demo_data import write_demo_datasets
from fedmoe.evaluation import validation_loss
from fedmoe.modeling import attach_lora, load_adapter_state, load_base_model
from fedmoe.strategy import GatewayMerge

THREADS = 1
DEMO_SYNC_INTERVAL = 10.0  # seconds, as in fedmoe/demo.py


def setup_torch(threads: int = THREADS) -> None:
    """Fix torch's CPU threads (the same for every compared arm) and the global seed."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark shares: ``--quick`` and ``--base-model``."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--quick", action="store_true", help="A short smoke run (< 2 min).")
    result.add_argument("--base-model", default="tiny", help="'tiny' or an HF id / path.")
    add_output_flags(result)
    return result


@dataclass(frozen=True)
class RunStart:
    """When a benchmark run began and the machine's load average then (its JSON has both)."""

    monotonic: float = field(default_factory=time.monotonic)
    load: list[float] = field(default_factory=lambda: list(os.getloadavg()))

    def seconds(self) -> float:
        """Seconds since the run began."""
        return time.monotonic() - self.monotonic


def start(options: argparse.ArgumentParser) -> tuple[argparse.Namespace, RunStart]:
    """Parse a benchmark's flags, set torch up (``setup_torch``) and note the start."""
    args = options.parse_args()
    setup_torch()
    return args, RunStart()


# --- data ------------------------------------------------------------------------------------


@dataclass
class Domain:
    """One demo domain, tokenized."""

    name: str
    train: list[TokenizedExample]
    validation: list[TokenizedExample]


def demo_domains(
    tokenizer: object, *, train_count: int = 400, validation_count: int = 60, max_length: int = 256
) -> dict[str, Domain]:
    """The demo's three generated domains (``fedmoe.demo_data``), tokenized."""
    directory = Path(tempfile.mkdtemp(prefix="fedmoe-bench-data-"))
    paths = write_demo_datasets(
        directory, train_count=train_count, validation_count=validation_count
    )
    return {
        name: Domain(
            name,
            tokenize_examples(load_examples(train), tokenizer, max_length=max_length),
            tokenize_examples(load_examples(valid), tokenizer, max_length=max_length),
        )
        for name, (train, valid) in paths.items()
    }


def shard(examples: Sequence[TokenizedExample], count: int, index: int) -> list[TokenizedExample]:
    """The ``index``-th of ``count`` disjoint, interleaved shards."""
    return list(examples[index::count])


def target_tokens(examples: Sequence[TokenizedExample]) -> float:
    """Mean target tokens per example (labels != -100 after the shift, as trained)."""
    return sum(sum(x != -100 for x in e.labels[1:]) for e in examples) / len(examples)


# --- evaluation ------------------------------------------------------------------------------


class Evaluator:
    """Validation loss of adapter states; one PEFT model per (rank, alpha), built on demand."""

    def __init__(self, base_model: str, lora: LoraSettings, domains: dict[str, Domain]) -> None:
        self.base_model, self.lora, self.domains = base_model, lora, domains
        self.models: dict[tuple[int, float], PeftModel] = {}
        base = load_base_model(base_model, device="cpu")
        self.pad = base.tokenizer.pad_token_id
        self.base = {d: self._loss(base.model, d) for d in domains}

    def _loss(self, model: torch.nn.Module, domain: str) -> float:
        return validation_loss(model, self.domains[domain].validation, pad_token_id=self.pad)

    def losses(
        self,
        state: AdapterState,
        *,
        rank: int | None = None,
        alpha: float | None = None,
        domains: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Loss of ``state`` (a LoRA of ``rank``/``alpha``) on each of ``domains``."""
        key = (rank or self.lora.rank, alpha or self.lora.alpha)
        if key not in self.models:
            settings = LoraSettings(
                rank=key[0], alpha=key[1], target_modules=self.lora.target_modules
            )
            base = load_base_model(self.base_model, device="cpu")
            self.models[key] = attach_lora(base.model, settings)
        model = self.models[key]
        load_adapter_state(model, state)
        return {d: self._loss(model, d) for d in (domains or self.domains)}

    def gateway(self, experts: Sequence[AdapterState], method: str = "cat") -> dict[str, float]:
        """Loss on every domain of the gateway that ``GatewayMerge(method)`` makes (uniform)."""
        merger = GatewayMerge(method=method, lora=self.lora)
        rank, alpha = merger.gateway_rank_alpha(len(experts))
        state = merger.merge(list(experts), [1.0] * len(experts))
        return self.losses(state, rank=rank, alpha=alpha)


def mean(values: dict[str, float] | Sequence[float]) -> float:
    """The mean of a dict's values or a sequence."""
    items = list(values.values()) if isinstance(values, dict) else list(values)
    return sum(items) / len(items)
