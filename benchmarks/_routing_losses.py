"""``benchmarks.routing_bench``'s data and losses: the demo domains kept aligned with their
tokenisation, experts trained by ``LocalTrainer`` (cached as safetensors), and the
token-weighted loss of any adapter, merge, routed gateway or peft Arrow model."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import ArrowConfig, create_arrow_model
from safetensors.torch import load_file, save_file

from benchmarks.simulation import Workbench
from fedmoe.adapters import write_peft_dir
from fedmoe.aggregate import AdapterState
from fedmoe.batching import TokenizedExample, count_trainable_tokens, tokenize_example
from fedmoe.config import LoraSettings
from fedmoe.data import Example, load_examples
from fedmoe.demo_data import write_demo_datasets
from fedmoe.evaluation import validation_loss
from fedmoe.modeling import attach_lora, load_adapter_state, load_base_model
from fedmoe.routing import Router
from fedmoe.strategy import GatewayMerge

CACHE = Path(tempfile.gettempdir()) / "fedmoe-routing-bench"


@dataclass
class Split:
    """One domain's examples (raw, for routing) and their tokenisation (for losses)."""

    train: list[Example]
    validation: list[Example]
    train_tokens: list[TokenizedExample]
    validation_tokens: list[TokenizedExample]


def load_domains(tokenizer: Any, train_count: int, validation_count: int) -> dict[str, Split]:
    """The demo's generated domains, kept aligned: raw example i ↔ tokenized example i."""
    paths = write_demo_datasets(
        Path(tempfile.mkdtemp(prefix="fedmoe-routing-data-")),
        train_count=train_count,
        validation_count=validation_count,
    )
    result = {}
    for name, (train_path, valid_path) in paths.items():
        train, valid = load_examples(train_path), load_examples(valid_path)

        def tok(examples: list[Example]) -> list[TokenizedExample]:
            return [tokenize_example(e, tokenizer, max_length=256) for e in examples]

        result[name] = Split(train, valid, tok(train), tok(valid))
    return result


# --- training (cached) -----------------------------------------------------------------------


def trained(
    bench: Workbench, key: str, examples: list[TokenizedExample], steps: int
) -> AdapterState:
    """``steps`` LocalTrainer steps on ``examples`` from the shared initial adapter (cached)."""
    path = CACHE / f"{key}-{steps}.safetensors"
    if path.exists():
        return load_file(str(path))
    worker = bench.worker(key, key, examples)
    for _ in range(steps):
        bench.step(worker)
    state = bench.state_of(worker)
    bench.occupant = None
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state


# --- evaluation ------------------------------------------------------------------------------


class Losses:
    """Token-weighted validation loss of adapters on any subset of examples."""

    def __init__(self, base_model: str, lora: LoraSettings, pad: int) -> None:
        self.base_model, self.lora, self.pad = base_model, lora, pad
        self.models: dict[tuple[int, float], Any] = {}
        self.base = load_base_model(base_model, device="cpu").model

    def total(
        self, state: AdapterState | None, examples: Sequence[TokenizedExample], rank: int = 0
    ) -> tuple[float, int]:
        """(summed loss, target tokens) of ``state`` (None: the base) on ``examples``."""
        if not examples:
            return 0.0, 0
        model = self.base if state is None else self._model(state, rank or self.lora.rank)
        tokens = count_trainable_tokens(list(examples))
        loss = validation_loss(model, list(examples), pad_token_id=self.pad)
        return loss * tokens, tokens

    def _model(self, state: AdapterState, rank: int) -> Any:
        key = (rank, self.lora.alpha * rank / self.lora.rank)
        if key not in self.models:
            settings = LoraSettings(
                rank=key[0], alpha=key[1], target_modules=self.lora.target_modules
            )
            self.models[key] = attach_lora(
                load_base_model(self.base_model, device="cpu").model, settings
            )
        load_adapter_state(self.models[key], state)
        return self.models[key]

    def loss(
        self, state: AdapterState | None, examples: Sequence[TokenizedExample], rank: int = 0
    ) -> float:
        """Mean loss per target token."""
        total, tokens = self.total(state, examples, rank)
        return total / max(tokens, 1)


def merged(lora: LoraSettings, states: list[AdapterState], method: str, weights=None):  # type: ignore[no-untyped-def]
    """(state, rank) of a ``GatewayMerge`` of ``states``."""
    merger = GatewayMerge(method=method, lora=lora)
    rank, _ = merger.gateway_rank_alpha(len(states))
    return merger.merge(states, weights or [1.0] * len(states)), rank


def routed_loss(
    losses: Losses,
    lora: LoraSettings,
    router: Router,
    experts: dict[str, AdapterState],
    features: torch.Tensor,
    examples: list[TokenizedExample],
) -> tuple[float, dict[str, int]]:
    """Loss when each example is answered as the router decides; and where they went."""
    groups: dict[str, list[int]] = {}
    mixes: dict[str, dict[str, float]] = {}
    for index, decision in enumerate(router.route_batch(features)):
        label = decision.expert or (
            "merged" if decision.fallback == "merged" else json.dumps(decision.weights)
        )
        groups.setdefault(label, []).append(index)
        if decision.fallback == "mix":
            mixes[label] = decision.weights
    total = tokens = 0.0
    for label, indices in groups.items():
        subset = [examples[i] for i in indices]
        if label in experts:
            state, rank = experts[label], lora.rank
        elif label == "merged":
            state, rank = merged(lora, list(experts.values()), "cat")
        else:
            names = list(mixes[label])
            state, rank = merged(
                lora, [experts[n] for n in names], "cat", list(mixes[label].values())
            )
        part, count = losses.total(state, subset, rank)
        total, tokens = total + part, tokens + count
    where = {
        label if label in experts or label == "merged" else "mix": len(ix)
        for label, ix in groups.items()
    }
    return total / max(tokens, 1), where


def arrow_losses(
    base_model: str, lora: LoraSettings, experts: dict[str, AdapterState], domains: dict[str, Split]
) -> dict[int, dict[str, float]]:
    """peft's data-free Arrow router (per token) over the experts, top_k 1..3."""
    scratch = Path(tempfile.mkdtemp(prefix="fedmoe-arrow-"))
    paths = [
        str(write_peft_dir(state, lora, scratch / name, base_model=base_model))
        for name, state in experts.items()
    ]
    result = {}
    base = load_base_model(base_model, device="cpu")
    for top_k in (1, 2, 3):
        model = create_arrow_model(
            load_base_model(base_model, device="cpu").model,
            paths,
            ArrowConfig(top_k=top_k, router_temperature=1.0),
        )
        result[top_k] = {
            d: validation_loss(model, s.validation_tokens, pad_token_id=base.tokenizer.pad_token_id)
            for d, s in domains.items()
        }
    return result
