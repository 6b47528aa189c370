"""Incremental pulls: what changed in an expert since version V, on the wire and rebuilt.

With the plain update rule (θ ← θ + w·Δ) the coordinator answers ``GET
/v1/experts/{name}/adapter?since=V`` with the updates applied after V, in order: each
one's weight and its delta exactly as uploaded (bfloat16 stays bfloat16), as one
safetensors file whose tensors are named ``step<i>.<PEFT name>``. The worker replays them
onto its copy of version V with the coordinator's own rule (``apply_update``) and checks
the new state's digest (``X-FedMoE-State-Sha256``): a sum of the deltas would save
nothing in float32 and, rounded, would never reproduce the state bit for bit. The
caller's own update (``exclude``) is listed without tensors: it has them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedmoe.adapters import AdapterSchema, decode_adapter, read_header
from fedmoe.aggregate import AdapterState, apply_update

METADATA_KEY = "fedmoe_delta"


@dataclass(frozen=True)
class Step:
    """One applied update: its id, weight, the version it made, and its delta (None:
    the caller's own, left out)."""

    update_id: str
    weight: float
    version: int
    delta: AdapterState | None


@dataclass(frozen=True)
class ExpertChanges:
    """An answer to ``since=V``: the full state, or the steps from V (``delta_from``)."""

    version: int
    digest: str | None  # state_digest of the expert at ``version``
    state: AdapterState | None = None
    steps: list[Step] | None = None
    delta_from: int | None = None
    size: int = 0  # bytes on the wire


def encode_steps(
    since: int, version: int, steps: list[tuple[str, float, int, bytes | None]]
) -> bytes:
    """The ``since`` answer's safetensors: each body's tensors under ``step<i>.``."""
    tensors: dict[str, torch.Tensor] = {}
    listed = []
    for index, (update_id, weight, made, body) in enumerate(steps):
        listed.append(
            {"update_id": update_id, "weight": weight, "version": made, "sent": body is not None}
        )
        if body is not None:
            tensors |= {f"step{index}.{k}": v for k, v in load_safetensors(body).items()}
    meta = {"from": since, "to": version, "steps": listed}
    return save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(meta)})


def decode_steps(body: bytes, schema: AdapterSchema) -> tuple[int, list[Step]]:
    """The ``since`` answer's target version and steps (every delta validated as an upload
    is: exact keys and shapes, finite values)."""
    meta = json.loads(read_header(body)["__metadata__"][METADATA_KEY])
    tensors = load_safetensors(body)
    steps = []
    for index, item in enumerate(meta["steps"]):
        delta = None
        if item["sent"]:
            prefix = f"step{index}."
            part = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            delta = decode_adapter(save_safetensors(part), schema)
        steps.append(Step(item["update_id"], float(item["weight"]), int(item["version"]), delta))
    return int(meta["to"]), steps


def rebuild(
    base: Mapping[str, torch.Tensor], steps: list[Step], own: Mapping[str, AdapterState]
) -> AdapterState:
    """``base`` with every step applied in order, as the coordinator applied them; a step
    left out is taken from ``own`` (update id → the caller's float32 delta)."""
    state = dict(base)
    for step in steps:
        delta = step.delta if step.delta is not None else own[step.update_id]
        state = apply_update(state, delta, step.weight)
    return state
