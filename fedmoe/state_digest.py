"""A digest of an adapter state's float32 values, shared by the coordinator and workers.

The coordinator puts it in an update's acknowledgement; a worker that reproduced the new
expert locally (pulled + weight·Δ) compares digests instead of downloading the expert.
Each tensor's name, shape and float32 bytes go in, in sorted key order, so two states have
the same digest only if they are equal bit for bit (up to sha256 collisions).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of every tensor's name, shape and float32 values (sorted by name)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()
