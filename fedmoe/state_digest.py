"""A digest of an adapter state's float32 values, shared by the coordinator and workers.

The coordinator puts it in an update's acknowledgement (the field keeps its first name,
``state_sha256``); a worker that reproduced the new expert locally (pulled + weight·Δ)
compares digests instead of downloading the expert. It guards against a wrong
reproduction, not an attacker (the acknowledgement comes over the authenticated
connection it protects), so it is XXH3-128 (the ``xxhash`` package, bindings of the
reference C library): each tensor's float32 bytes hashed, then one hash over every
tensor's name, shape and hash in sorted key order. Two states have the same digest only if
they are equal bit for bit, up to an accidental 128-bit collision. The coordinator
computes it for every staleness-0 acknowledgement over the whole float32 expert, on the
path the acknowledgement waits for: for a 0.5B-sized expert (35 MB, 336 tensors) it took
7-10 ms as BLAKE3 on two threads (issue 13); as XXH3 about 3 ms on one (the ``xxhash``
binding keeps the GIL, so a second thread would only wait for it). A worker of an older
version (BLAKE3, 64 hex digits) sees a mismatch and pulls in full: slower, never wrong.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import xxhash


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """XXH3-128 of a tensor's values as float32 bytes (C order)."""
    values = tensor.detach()
    if values.dtype != torch.float32 or values.device.type != "cpu":  # e.g. a worker's GPU
        values = values.to("cpu", torch.float32)
    return xxhash.xxh3_128_digest(values.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Hex XXH3-128 of every tensor's name, shape and ``tensor_digest`` (sorted by name)."""
    listing = b"".join(
        f"{key}:{tuple(state[key].shape)};".encode() + tensor_digest(state[key])
        for key in sorted(state)
    )
    return xxhash.xxh3_128_hexdigest(listing)
