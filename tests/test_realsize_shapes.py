"""The real-size benchmark's LoRA shapes are the ones peft gives a Qwen2 model of that config."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from benchmarks._realsize_server import RANK, SHAPES, lora_shapes, parameters
from fedmoe.config import LoraSettings
from fedmoe.modeling import attach_lora, lora_parameters


@pytest.mark.parametrize("size", sorted(SHAPES))
def test_shapes_match_peft_on_a_qwen2_of_that_config(size: str) -> None:
    # two layers of the real widths, built on the meta device: no memory, no download
    model = dataclasses.replace(SHAPES[size], num_hidden_layers=2)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_key_value_heads,
    )
    with torch.device("meta"):
        peft_model = attach_lora(Qwen2ForCausalLM(config), LoraSettings(rank=RANK, alpha=32))
    theirs = {key: tuple(p.shape) for key, p in lora_parameters(peft_model).items()}
    assert theirs == lora_shapes(model)


def test_parameter_counts_are_the_issues_adapter_sizes() -> None:
    # issue 13: 35 MB (0.5B) and 162 MB (7B) in float32, 17.6 / 80.8 MB bodies in bf16
    assert round(4 * parameters(SHAPES["0.5B"]) / 1e6, 1) == 35.2
    assert round(4 * parameters(SHAPES["7B"]) / 1e6) == 161
    assert SHAPES["7B"].kv_size == 512 and SHAPES["0.5B"].kv_size == 128
