"""A digest of an adapter state's float32 values, shared by the coordinator and workers.

The coordinator puts it in an update's acknowledgement (the field keeps its first name,
``state_sha256``); a worker that reproduced the new expert locally (pulled + weight·Δ)
compares digests instead of downloading the expert. It is BLAKE3 (the ``blake3`` package,
bindings of the reference Rust crate) over each tensor's name, shape and the BLAKE3 of its
float32 bytes, in sorted key order, so two states have the same digest only if they are
equal bit for bit (up to hash collisions). The coordinator computes it for every
staleness-0 acknowledgement over the whole float32 expert: BLAKE3 does that several times
faster than SHA-256, and hashing tensor by tensor lets the work split over two threads
(``fedmoe.parallel``). It guards against a wrong reproduction, not an attacker.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from blake3 import blake3

from fedmoe.parallel import per_tensor


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """BLAKE3 of a tensor's values as float32 bytes (C order)."""
    values = tensor.detach().to("cpu", torch.float32).contiguous()
    digest = blake3()
    if values.numel():
        digest.update(values.view(torch.uint8).numpy().data)
    return digest.digest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Hex BLAKE3 of every tensor's name, shape and ``tensor_digest`` (sorted by name)."""
    keys = sorted(state)
    parts = per_tensor(
        lambda key: tensor_digest(state[key]), keys, [state[k].numel() for k in keys]
    )
    digest = blake3()
    for key in keys:
        digest.update(f"{key}:{tuple(state[key].shape)};".encode())
        digest.update(parts[key])
    return digest.hexdigest()
