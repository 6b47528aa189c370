"""Fetch the gateway or an expert as a standard PEFT adapter directory, and use it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fedmoe.adapters import decode_adapter, read_header, write_peft_dir
from fedmoe.client import CoordinatorClient
from fedmoe.config import LoraSettings
from fedmoe.modeling import load_base_model

logger = logging.getLogger(__name__)


def fetch_adapter_dir(
    client: CoordinatorClient, directory: Path, *, expert: str | None = None
) -> dict[str, Any]:
    """Download the gateway (or ``expert``) and write it as a PEFT adapter directory.

    Returns what was written: name, version, rank, alpha and the directory.
    """
    schema = client.schema()
    lora = LoraSettings.from_dict(schema.lora_config.model_dump())
    if expert is None:
        info = client.gateway_info()
        version, body, _ = client.download("/v1/gateway/adapter")
        rank, alpha, name = info.lora_rank, info.lora_alpha, "gateway"
    else:
        version, body, _ = client.download(f"/v1/experts/{expert}/adapter")
        rank, alpha, name = lora.rank, lora.alpha, expert
    shapes = _shapes_of(body or b"")
    state = decode_adapter(body or b"", shapes)
    write_peft_dir(
        state,
        lora,
        directory,
        base_model=schema.base_model,
        rank=rank,
        alpha=alpha,
        metadata={"fedmoe_name": name, "fedmoe_version": str(version)},
    )
    logger.info("wrote %s v%d to %s", name, version, directory)
    return {
        "name": name,
        "version": version,
        "rank": rank,
        "alpha": alpha,
        "directory": str(directory),
        "base_model": schema.base_model,
    }


def _shapes_of(body: bytes) -> dict[str, tuple[int, ...]]:
    """Tensor shapes as the coordinator declares them in the header."""
    header = read_header(body)
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def load_with_adapter(
    base_model: str, adapter_dir: Path, *, device: str = "auto"
) -> tuple[PeftModel, Any]:
    """The base model with a PEFT adapter directory loaded on top, and its tokenizer."""
    base = load_base_model(base_model, device=device)
    model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    return model.eval(), base.tokenizer


@torch.no_grad()
def generate(model: PeftModel, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64) -> str:
    """Greedy completion of ``prompt``."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return str(
        tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    )
