"""Base models and LoRA: loading, fingerprinting, and moving adapter weights in and out.

``tiny`` is the built-in offline preset; anything else is an HF causal-LM id or
local path loaded through transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from fedmoe.aggregate import AdapterState
from fedmoe.config import LoraSettings
from fedmoe.presets import check_local_name
from fedmoe.tiny import TINY_NAME, build_tiny_model, build_tiny_tokenizer

logger = logging.getLogger(__name__)

# Architecture-defining config fields; other fields vary with the transformers version.
ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "hidden_act",
)


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer, name and fingerprint."""

    name: str
    model: PreTrainedModel
    tokenizer: Any  # a transformers tokenizer (fast or slow, per model)
    fingerprint: str


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; a device this machine lacks is a
    ``ValueError`` naming it (not an assertion deep inside torch)."""
    if device != "auto":
        try:
            target = torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"device {device!r}: {error}") from None
        if target.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: CUDA is not available to torch {torch.__version__}"
            )
        mps = getattr(torch.backends, "mps", None)
        if target.type == "mps" and not (mps and mps.is_available()):
            raise ValueError(f"device {device!r}: Apple MPS is not available on this machine")
        return target
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_base_model(
    name: str, *, device: str = "auto", dtype: torch.dtype | None = None
) -> BaseModel:
    """Load ``tiny`` or an HF id / local path, fingerprint it, and move it to ``device``."""
    target = resolve_device(device)
    if name == TINY_NAME:
        model, tokenizer = build_tiny_model(), build_tiny_tokenizer()
    else:
        model, tokenizer = _from_pretrained(name, dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fingerprint = fingerprint_model(model)
    model = model.to(target, dtype=dtype) if dtype else model.to(target)
    logger.info("loaded base model %s (%s) on %s", name, fingerprint, target)
    return BaseModel(name=name, model=model, tokenizer=tokenizer, fingerprint=fingerprint)


def _from_pretrained(name: str, dtype: torch.dtype | None) -> tuple[PreTrainedModel, Any]:
    """An HF id or local directory; OSError saying which model could not be loaded, and why."""
    check_local_name(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
    except (OSError, ValueError) as error:  # HF reports a bad id as ValueError
        raise OSError(f"base model {name!r} could not be loaded: {error}") from None
    return model, tokenizer


def fingerprint_model(model: PreTrainedModel) -> str:
    """``config:<hash>/weights:<hash>`` of the architecture and all base weights.

    Weights are hashed as bfloat16 so that a model loaded in float32 on one
    machine and bfloat16 on another gets the same fingerprint.
    """
    config = model.config.to_dict()
    arch = {key: config.get(key) for key in ARCHITECTURE_KEYS}
    config_hash = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    weights = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        if "lora_" in key:
            continue
        weights.update(f"{key}:{tuple(tensor.shape)};".encode())
        raw = tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
        weights.update(raw.numpy().tobytes())
    return f"config:{config_hash}/weights:{weights.hexdigest()[:16]}"


def attach_lora(model: PreTrainedModel, lora: LoraSettings) -> PeftModel:
    """Wrap ``model`` with a LoRA adapter initialised from ``lora.seed``."""
    devices = {p.device for p in model.parameters()}
    with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]):
        torch.manual_seed(lora.seed)
        return get_peft_model(model, lora.to_peft())


def lora_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """LoRA parameters keyed by their PEFT state-dict key (the adapter name removed)."""
    adapter = f".{model.active_adapter}."
    return {
        name.replace(adapter, "."): parameter
        for name, parameter in model.named_parameters()
        if "lora_" in name
    }


def adapter_state(model: PeftModel) -> AdapterState:
    """A float32 CPU copy of the model's LoRA weights under PEFT keys."""
    return {k: p.detach().float().cpu().clone() for k, p in sorted(lora_parameters(model).items())}


@torch.no_grad()
def load_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's LoRA parameters in place (optimizer state survives)."""
    parameters = lora_parameters(model)
    if set(parameters) != set(state):
        raise ValueError("adapter keys do not match the model's LoRA parameters")
    for key, parameter in parameters.items():
        parameter.copy_(state[key].to(parameter.device, parameter.dtype))


def initial_adapter(base: BaseModel, lora: LoraSettings) -> AdapterState:
    """The seeded starting adapter every expert shares (the base model is left unwrapped)."""
    peft_model = attach_lora(base.model, lora)
    state = adapter_state(peft_model)
    peft_model.unload()
    return state
