"""One rank of the DDP equivalence test (``tests/test_ddp.py``), started by torchrun.

Trains the tiny model's LoRA for a few steps on its share of each global micro-batch and,
on rank 0, writes the adapter and the step results to the output directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedmoe.batching import tokenize_examples
from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.data import load_examples
from fedmoe.modeling import adapter_state, attach_lora, load_base_model
from fedmoe.worker.distributed import init_from_env, shutdown
from fedmoe.worker.trainer import LocalTrainer


def train(dataset: Path, settings: TrainSettings, steps: int, distributed: bool) -> tuple:
    """(adapter, [(loss, tokens) per step]) after ``steps`` steps."""
    torch.set_num_threads(1)
    context = init_from_env("cpu") if distributed else None
    base = load_base_model("tiny", device="cpu")
    examples = tokenize_examples(load_examples(dataset), base.tokenizer, max_length=128)
    model = attach_lora(base.model, LoraSettings())
    trainer = LocalTrainer(
        model,
        examples,
        settings,
        pad_token_id=base.tokenizer.pad_token_id,
        device=torch.device("cpu"),
        learning_rate=1e-2,
        dist=context,
    )
    results = [trainer.step() for _ in range(steps)]
    return adapter_state(model), [(r.loss, r.tokens) for r in results], context


if __name__ == "__main__":
    dataset, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    settings = TrainSettings.model_validate_json(sys.argv[4])
    state, results, context = train(dataset, settings, steps, distributed=True)
    if context is not None and context.is_main:
        save_file(state, str(out / "adapter.safetensors"))
        (out / "steps.json").write_text(json.dumps(results))
    shutdown()
