"""``--load-in-4bit``: QLoRA, a 4-bit NF4 base model (bitsandbytes) under a LoRA adapter.

Only the frozen base is quantised; the LoRA weights, their gradients and the deltas the
worker uploads stay float32, so the coordinator and the other workers see the same
adapter as from a full-precision worker. The base model's fingerprint is taken from the
bfloat16 weights before quantisation (the same fingerprint the coordinator computes), so
the whole model is read once in bfloat16 on the CPU first.

Needs a CUDA device and ``pip install 'fedmoe[qlora]'`` (bitsandbytes).
"""

from __future__ import annotations

import gc
import importlib.util
import logging

import torch

from fedmoe.modeling import BaseModel, _from_pretrained, fingerprint_model, resolve_device
from fedmoe.tiny import TINY_NAME
from fedmoe.worker.speed import SpeedSetupError

logger = logging.getLogger(__name__)


def check_qlora(device: torch.device) -> None:
    """Refuse, with what is missing, unless bitsandbytes and a CUDA device are there."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SpeedSetupError(
            "--load-in-4bit needs bitsandbytes: pip install 'fedmoe[qlora]' (on a CUDA machine)"
        )
    if device.type != "cuda":
        raise SpeedSetupError(f"--load-in-4bit needs a CUDA device, got --device {device}")


def load_quantized_base(name: str, *, device: str = "auto") -> BaseModel:
    """``name`` with its linear layers in 4-bit NF4 on ``device``, prepared for LoRA training."""
    target = resolve_device(device)
    check_qlora(target)
    if name == TINY_NAME:
        raise SpeedSetupError("--load-in-4bit is for real base models, not the 'tiny' preset")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    full, tokenizer = _from_pretrained(name, torch.bfloat16)
    fingerprint = fingerprint_model(full)
    del full
    gc.collect()
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        name, quantization_config=config, device_map={"": target}, dtype=torch.bfloat16
    )
    # Checkpointing is the --gradient-checkpointing switch's business, not this one's.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("loaded %s in 4-bit NF4 (%s) on %s", name, fingerprint, target)
    return BaseModel(name=name, model=model, tokenizer=tokenizer, fingerprint=fingerprint)
