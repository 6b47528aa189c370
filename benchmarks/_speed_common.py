"""What the worker-speed benchmarks (``worker_speed_bench`` on CPU, ``gpu_speed`` on a GPU)
share: the Qwen2.5 shapes they build random-weight models of, and the timed step loop.

Imports only torch and transformers: ``gpu_speed`` runs on machines without the rest of
FedMoE's dependencies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import Qwen2Config

Step = Callable[[], int]  # one optimizer step; returns the target tokens it trained

# The Hugging Face configs of Qwen/Qwen2.5-0.5B and -7B, and a tiny one for smoke runs.
SHAPES: dict[str, dict[str, Any]] = {
    "0.5B": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "7B": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "smoke": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    },
}


def qwen_config(shape: str, **overrides: Any) -> Qwen2Config:
    """The Qwen2 config of ``shape`` (a key of ``SHAPES``), Qwen2.5's context and RoPE θ."""
    return Qwen2Config(
        **SHAPES[shape], max_position_embeddings=32768, rope_theta=1_000_000.0, **overrides
    )


def timed(step: Step, steps: int, device: torch.device) -> tuple[int, float]:
    """Run ``steps`` steps; (target tokens, seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    began, tokens = time.perf_counter(), 0
    for _ in range(steps):
        tokens += step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - began
