"""One process (or one torchrun rank) of the worker speed benchmark's DDP scaling run.

``python -m benchmarks._ddp_speed DATASET STEPS SETTINGS_JSON OUT.json`` trains the tiny
model's LoRA with ``LocalTrainer`` (under DDP when torchrun started several ranks, the
global batch unchanged) and rank 0 writes ``{"tokens", "seconds", "world_size"}`` of the
timed steps (after 2 warm-up steps) to ``OUT.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from fedmoe.batching import tokenize_examples
from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.data import load_examples
from fedmoe.modeling import attach_lora, load_base_model
from fedmoe.worker.distributed import init_from_env, launched_by_torchrun, shutdown
from fedmoe.worker.trainer import LocalTrainer

WARMUP = 2


def main() -> None:
    """Train, time, write."""
    dataset, steps = Path(sys.argv[1]), int(sys.argv[2])
    settings = TrainSettings.model_validate_json(sys.argv[3])
    torch.set_num_threads(1)
    context = init_from_env("cpu") if launched_by_torchrun() else None
    base = load_base_model("tiny", device="cpu")
    examples = tokenize_examples(
        load_examples(dataset), base.tokenizer, max_length=settings.max_length
    )
    trainer = LocalTrainer(
        attach_lora(base.model, LoraSettings()),
        examples,
        settings,
        pad_token_id=base.tokenizer.pad_token_id,
        device=torch.device("cpu"),
        learning_rate=1e-2,
        dist=context,
    )
    for _ in range(WARMUP):
        trainer.step()
    began, tokens = time.perf_counter(), 0
    for _ in range(steps):
        tokens += trainer.step().tokens  # global: every rank's share
    seconds = time.perf_counter() - began
    if context is None or context.is_main:
        world = context.world_size if context else 1
        result = {"tokens": tokens, "seconds": seconds, "world_size": world}
        Path(sys.argv[4]).write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main()
