"""Worker speed on a GPU: plain peft loop vs FedMoE's loop with each speed feature.

Run on a CUDA machine through ``bash benchmarks/gpu_speed.sh`` (which brings the few
dependencies a bare torch + transformers + peft machine lacks); it writes
``benchmarks/results/worker-speed-gpu.json`` (then ``python -m benchmarks.render``).
``--smoke`` runs every arm for a step or two on tiny shapes (CPU works), writing nothing
to the results unless ``--results-dir`` says where.

* Qwen2.5-0.5B shape (random bf16 weights), LoRA r=16 (alpha 32) on all projections,
  batch 16 × 1024 tokens, every token a target: the plain peft loop (``labels=``, the
  model's own loss) against ``LocalTrainer`` with the full loss, the chunked loss,
  Liger's fused loss (when ``liger_kernel`` imports), per-layer ``torch.compile`` and
  gradient checkpointing; tokens/s and peak GPU memory of each.
* Packing: the same on examples of 256-1024 tokens, padded vs packed (SDPA, and flex
  attention, which skips the blocks the packed mask hides).
* Qwen2.5-7B shape, gradient checkpointing: plain peft vs FedMoE (chunked loss).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2ForCausalLM

from benchmarks._speed_common import SHAPES, qwen_config, timed
from benchmarks.report import publish
from fedmoe.batching import BatchStream, TokenizedExample, collate, count_trainable_tokens
from fedmoe.config import ALL_PROJECTIONS, LoraSettings, TrainSettings
from fedmoe.modeling import attach_lora
from fedmoe.worker.speed import liger_available
from fedmoe.worker.trainer import LocalTrainer

LORA = LoraSettings(rank=16, alpha=32.0)


@dataclass(frozen=True)
class Arm:
    """One measured configuration."""

    name: str
    shape: str
    loop: str  # "plain" or "fedmoe"
    settings: dict[str, Any]
    variable_length: bool = False
    attention: str = "sdpa"


def build_model(shape: str, device: torch.device, attention: str) -> Qwen2ForCausalLM:
    """Random bf16 weights made directly on ``device`` (a 7B model in seconds)."""
    config = qwen_config(shape, use_cache=False)
    config._attn_implementation = attention
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def make_examples(
    count: int, length: int, vocab: int, variable: bool, seed: int = 0
) -> list[TokenizedExample]:
    """Random token sequences, every token a target (``length`` or 1/4..1 of it)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        size = rng.randint(length // 4, length) if variable else length
        ids = [rng.randrange(vocab) for _ in range(size)]
        examples.append(TokenizedExample(ids, list(ids)))
    return examples


def plain_step(model: Any, examples: list[TokenizedExample], batch: int, device: torch.device):
    """The plain loop: get_peft_model, AdamW, the model's own loss, clipping at 1."""
    config = LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, target_modules=list(ALL_PROJECTIONS))
    peft = get_peft_model(model, config)
    peft.train()
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    stream = iter(BatchStream(examples, batch_size=batch, seed=0))

    def step() -> int:
        inputs = collate(next(stream), 0)
        tokens = count_trainable_tokens(inputs)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = peft(**inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens

    return step


def fedmoe_step(model: Any, examples, batch: int, device: torch.device, settings: dict):
    """FedMoE's loop: attach_lora + LocalTrainer with these switches."""
    train = TrainSettings(batch_size=batch, max_length=4096, **settings)
    trainer = LocalTrainer(
        attach_lora(model, LORA), examples, train, pad_token_id=0, device=device, learning_rate=2e-4
    )
    return lambda: trainer.step().tokens


def measure(step: Callable[[], int], warmup: int, steps: int, device: torch.device) -> dict:
    """Tokens/s over ``steps`` steps after ``warmup``; peak memory of the whole arm."""
    for _ in range(warmup):
        step()
    tokens, seconds = timed(step, steps, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"tokens_per_second": tokens / seconds, "seconds": seconds, "peak_gib": peak}


def run_arm(arm: Arm, device: torch.device, sizes: dict[str, int]) -> dict[str, Any]:
    """Build, measure and free one arm; an error is recorded, not raised."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    group = f"{arm.shape}{' variable length' if arm.variable_length else ''}"
    result: dict[str, Any] = {"arm": arm.name, "shape": arm.shape, "loop": arm.loop, "group": group}
    result |= {"settings": arm.settings, "attention": arm.attention}
    try:
        if arm.attention == "flex_attention" and device.type != "cuda":
            raise RuntimeError("flex attention is measured on CUDA only (its CPU compile is slow)")
        model = build_model(arm.shape, device, arm.attention)
        vocab = SHAPES[arm.shape]["vocab_size"]
        examples = make_examples(sizes["examples"], sizes["length"], vocab, arm.variable_length)
        if arm.loop == "plain":
            if arm.settings.get("gradient_checkpointing") == "on":
                model.gradient_checkpointing_enable({"use_reentrant": False})
            step = plain_step(model, examples, sizes["batch"], device)
        else:
            step = fedmoe_step(model, examples, sizes["batch"], device, arm.settings)
        steps = sizes["steps_7b"] if arm.shape == "7B" else sizes["steps"]
        result |= measure(step, sizes["warmup"], steps, device)
    except Exception as error:  # one failing arm (OOM, no kernel) must not lose the others
        result["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        traceback.print_exc()
    finally:
        model = step = None  # free the GPU before the next arm
        torch._dynamo.reset()  # compiled layers hold on to their model otherwise
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)
    return result


def arms(shape: str, large: str | None) -> list[Arm]:
    """Every arm of the run (``shape``: the 0.5B or the smoke shape)."""
    full = {"packing": "off", "cross_entropy": "full"}
    chunked = {"packing": "off", "cross_entropy": "chunked"}
    result = [
        Arm("plain transformers + peft", shape, "plain", {}),
        Arm("FedMoE, full logits", shape, "fedmoe", full),
        Arm("FedMoE + chunked CE", shape, "fedmoe", chunked),
    ]
    if liger_available():
        result.append(
            Arm("FedMoE + Liger fused CE", shape, "fedmoe", {**chunked, "cross_entropy": "liger"})
        )
    result += [
        Arm(
            "FedMoE + chunked CE + torch.compile",
            shape,
            "fedmoe",
            {**chunked, "torch_compile": "on"},
        ),
        Arm(
            "FedMoE + chunked CE + checkpointing",
            shape,
            "fedmoe",
            {**chunked, "gradient_checkpointing": "on"},
        ),
        Arm("variable length: plain peft (padded)", shape, "plain", {}, True),
        Arm("variable length: FedMoE chunked, padded", shape, "fedmoe", chunked, True),
        Arm(
            "variable length: FedMoE chunked, packed (SDPA)",
            shape,
            "fedmoe",
            {**chunked, "packing": "on"},
            True,
        ),
        Arm(
            "variable length: FedMoE chunked, packed (flex attention)",
            shape,
            "fedmoe",
            {**chunked, "packing": "on"},
            True,
            "flex_attention",
        ),
    ]
    if large:
        ckpt = {"gradient_checkpointing": "on"}
        result += [
            Arm("7B: plain peft + checkpointing", large, "plain", ckpt),
            Arm("7B: FedMoE chunked CE + checkpointing", large, "fedmoe", {**chunked, **ckpt}),
        ]
    return result


def main() -> None:
    """Run every arm and publish ``worker-speed-gpu``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes, 1 step (CPU ok).")
    parser.add_argument("--no-7b", action="store_true", help="Skip the 7B shape.")
    parser.add_argument(
        "--only", action="append", default=[], help="Run the arms whose name has this text."
    )
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke for a CPU check of the script")
    started = time.monotonic()
    if args.smoke:
        sizes = {"batch": 2, "length": 32, "examples": 8, "warmup": 1, "steps": 1, "steps_7b": 1}
        shape, large = "smoke", ("smoke" if not args.no_7b else None)
    else:
        sizes = {
            "batch": 16,
            "length": 1024,
            "examples": 64,
            "warmup": 3,
            "steps": 10,
            "steps_7b": 4,
        }
        shape, large = "0.5B", (None if args.no_7b else "7B")
    chosen = [a for a in arms(shape, large) if not args.only or any(t in a.name for t in args.only)]
    results = [run_arm(arm, device, sizes) for arm in chosen]
    plains = {r["group"]: r for r in results if r["loop"] == "plain" and "tokens_per_second" in r}
    for result in results:  # against the plain loop of the same shape and data
        plain = plains.get(result["group"])
        if "tokens_per_second" in result and plain is not None:
            result["ratio"] = result["tokens_per_second"] / plain["tokens_per_second"]
    values = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "lora_rank": LORA.rank,
        "sizes": sizes,
        "smoke": args.smoke,
        "arms": results,
        "wall_seconds": time.monotonic() - started,
    }
    if args.smoke and args.results_dir is None:
        print(json.dumps(values, indent=2) + "\n(smoke run: not recorded)")
        return
    namespace = argparse.Namespace(quick=False, write=True, results_dir=args.results_dir)
    publish("worker-speed-gpu", "Worker speed on a GPU", values, namespace)


if __name__ == "__main__":
    main()
