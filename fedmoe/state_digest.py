"""A digest of an adapter state's float32 values, shared by the coordinator and workers.

The coordinator puts it in an update's acknowledgement (the field keeps its first name,
``state_sha256``); a worker that reproduced the new expert locally (pulled + weight·Δ)
compares digests instead of downloading the expert. Each tensor's name, shape and float32
bytes go in, in sorted key order, so two states have the same digest only if they are
equal bit for bit (up to hash collisions). The hash is BLAKE3 (the ``blake3`` package,
bindings of the reference Rust crate): on the coordinator it is computed for every
staleness-0 acknowledgement, over the whole float32 expert, and BLAKE3 does that several
times faster than SHA-256. It guards against a wrong reproduction, not an attacker.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from blake3 import blake3


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Hex BLAKE3-256 of every tensor's name, shape and float32 values (sorted by name)."""
    digest = blake3()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy().data)
    return digest.hexdigest()
