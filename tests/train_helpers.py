"""Helpers for the tests that train the tiny model in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedmoe.batching import tokenize_training_set
from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.data import load_examples
from fedmoe.modeling import attach_lora, load_base_model
from fedmoe.worker.trainer import LocalTrainer


def tiny_lora_trainer(
    dataset: Path, settings: TrainSettings, *, max_length: int
) -> tuple[Any, LocalTrainer]:
    """The tiny base model with a fresh LoRA adapter (the shared initial one) and a
    ``LocalTrainer`` over ``dataset`` at learning rate 1e-2, on the CPU."""
    base = load_base_model("tiny", device="cpu")
    examples = tokenize_training_set(
        load_examples(dataset), base.tokenizer, max_length=max_length, source=dataset
    )
    model = attach_lora(base.model, LoraSettings())
    trainer = LocalTrainer(
        model,
        examples,
        settings,
        pad_token_id=base.tokenizer.pad_token_id,
        device=torch.device("cpu"),
        learning_rate=1e-2,
    )
    return model, trainer
