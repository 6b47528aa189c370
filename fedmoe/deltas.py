"""Incremental pulls: what changed in an expert since version V, on the wire and rebuilt.

With the plain update rule (θ ← θ + w·Δ) the coordinator answers ``GET
/v1/experts/{name}/adapter?since=V`` with the updates applied after V, in order: each
one's weight and its delta exactly as uploaded (bfloat16 stays bfloat16), as one
safetensors file whose tensors are named ``step<i>.<PEFT name>``. The worker replays them
onto its copy of version V with the coordinator's own rule (``apply_update``) and checks
the new state's digest (``X-FedMoE-State-Sha256``): a sum of the deltas would save
nothing in float32 and, rounded, would never reproduce the state bit for bit. The
caller's own update (``exclude``) is listed without tensors: it has them.

A step that closed a FedAvg round (``fedmoe.fedavg_round``) lists ``round``: the version
the round started from (V or a step's) and the final weights of its earlier updates
(listed before it); the state is then that version's plus the weighted mean of the
round's deltas, summed as the coordinator summed it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedmoe.adapters import AdapterSchema, decode_adapter, read_header
from fedmoe.aggregate import AdapterState, apply_update, weighted_average
from fedmoe.strategy_state import RoundClose

METADATA_KEY = "fedmoe_delta"


@dataclass(frozen=True)
class Step:
    """One applied update: its id, weight, the version it made, and its delta (None:
    the caller's own, left out)."""

    update_id: str
    weight: float
    version: int
    delta: AdapterState | None
    close: RoundClose | None = None  # the step closed a FedAvg round


#: one step as the coordinator lists it: update id, weight, version made, body (None:
#: the caller's own) and the FedAvg round it closed
StepSource = tuple[str, float, int, bytes | None, RoundClose | None]


@dataclass(frozen=True)
class ExpertChanges:
    """An answer to ``since=V``: the full state, or the steps from V (``delta_from``)."""

    version: int
    digest: str | None  # state_digest of the expert at ``version``
    state: AdapterState | None = None
    steps: list[Step] | None = None
    delta_from: int | None = None
    size: int = 0  # bytes on the wire


def encode_steps(since: int, version: int, steps: list[StepSource]) -> bytes:
    """The ``since`` answer's safetensors: each body's tensors under ``step<i>.``."""
    tensors: dict[str, torch.Tensor] = {}
    listed: list[dict[str, object]] = []
    for index, (update_id, weight, made, body, close) in enumerate(steps):
        item = {"update_id": update_id, "weight": weight, "version": made, "sent": body is not None}
        if close is not None:
            item["round"] = {"base": close.base, "earlier": [list(e) for e in close.earlier]}
        listed.append(item)
        if body is not None:
            tensors |= {f"step{index}.{k}": v for k, v in load_safetensors(body).items()}
    meta = {"from": since, "to": version, "steps": listed}
    return save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(meta)})


def decode_steps(body: bytes, schema: AdapterSchema) -> tuple[int, list[Step]]:
    """The ``since`` answer's target version and steps (every delta validated as an upload
    is: exact keys and shapes, finite values)."""
    meta = json.loads(read_header(body)["__metadata__"][METADATA_KEY])
    tensors = load_safetensors(body)
    steps: list[Step] = []
    for index, item in enumerate(meta["steps"]):
        delta = None
        if item["sent"]:
            prefix = f"step{index}."
            part = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            delta = decode_adapter(save_safetensors(part), schema)
        close = _round(item.get("round"), int(meta["from"]), steps)
        made = int(item["version"])
        steps.append(Step(item["update_id"], float(item["weight"]), made, delta, close))
    return int(meta["to"]), steps


def _round(listed: dict[str, Any] | None, since: int, before: list[Step]) -> RoundClose | None:
    """A step's FedAvg round, checked: its start and earlier updates lie before it."""
    if listed is None:
        return None
    close = RoundClose(int(listed["base"]), tuple((str(u), float(w)) for u, w in listed["earlier"]))
    if close.base != since and close.base not in {step.version for step in before}:
        raise ValueError(f"a round starts at v{close.base}, not in the answer")
    if any(u not in {step.update_id for step in before} for u, _ in close.earlier):
        raise ValueError("a round names an update not listed before it")
    return close


def rebuild(
    base: Mapping[str, torch.Tensor],
    steps: list[Step],
    own: Mapping[str, AdapterState],
    since: int,
) -> AdapterState:
    """``base`` (version ``since``) with every step applied in order, as the coordinator
    applied them; a step left out is taken from ``own`` (update id → the caller's float32
    delta)."""
    state, known = dict(base), dict(own)
    starts = {step.close.base for step in steps if step.close is not None}
    at = {since: state} if since in starts else {}
    for step in steps:
        delta = step.delta if step.delta is not None else own[step.update_id]
        known[step.update_id] = delta
        if step.close is None:
            state = apply_update(state, delta, step.weight)
        else:  # θ at the round's start + the weighted mean of its deltas
            earlier = step.close.earlier
            weights = [w for _, w in earlier] + [step.weight]
            mean = weighted_average([known[u] for u, _ in earlier] + [delta], weights)
            state = apply_update(at[step.close.base], mean, 1.0)
        if step.version in starts:
            at[step.version] = state
    return state
