"""Adapter slots that snapshot into reused buffers and rebase in place.

A background sync costs the training thread two things (issue 13): the *snapshot* of the
adapter when a sync starts and the *rebase* at the step that collects it,
local ← (local − snapshot) + newest. Done through ``AdapterSlot.state()``/``load()`` each
is a fresh float32 copy of the whole adapter (page faults on every new allocation) plus a
second pass to copy it back. An ``InPlaceSlot`` does each with no allocation:
``copy_into`` writes the adapter into buffers the ``Syncer`` allocated once, ``rebase``
applies the rule to the trained tensors themselves, one tensor at a time (``rebase_``:
two in-place operations while the tensor is in cache). Both split the tensors in two halves,
one on a helper thread (``fedmoe.parallel``), so the training thread waits about half as
long where a second core is free.

The arithmetic is the rule's, bit for bit: ``(local − since) + newest`` in float32, in
that order (``local − since`` is the progress the tests compare; adding a precomputed
``newest − since`` instead would round differently). A slot that only has
``state``/``load`` gets the same arithmetic through ``snapshot_into``/``rebase_slot``.

On a GPU, the worker's ``fedmoe.worker.peft_slot.PeftAdapterSlot.copy_into`` is one
device-to-host copy (and cast) per tensor into the host buffers, and its ``rebase``
copies ``since`` and ``newest`` to the device and applies the rule there (CUDA's float32
subtraction and addition round as the CPU's do); LoRA weights that are not float32 are
rebased in float32 and cast back, as ``load`` did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import torch

from fedmoe.aggregate import AdapterState
from fedmoe.parallel import per_tensor
from fedmoe.worker.sync_seams import AdapterSlot

__all__ = [
    "InPlaceSlot",
    "TensorSlot",
    "check_keys",
    "each_tensor",
    "rebase_",
    "rebase_slot",
    "snapshot_into",
]


@runtime_checkable
class InPlaceSlot(Protocol):
    """An ``AdapterSlot`` that can also snapshot into given buffers and rebase in place."""

    def state(self) -> AdapterState:
        """A float32 copy of the current LoRA tensors under PEFT names."""
        ...

    def load(self, state: AdapterState) -> None:
        """Overwrite the LoRA tensors (optimizer state survives)."""
        ...

    def copy_into(self, out: AdapterState) -> None:
        """Copy the current tensors (as float32) into ``out``'s tensors, same keys."""
        ...

    def rebase(self, since: AdapterState, newest: AdapterState) -> None:
        """In place: every tensor t ← (t − since) + newest (``rebase_``)."""
        ...


def rebase_(tensor: torch.Tensor, since: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
    """``tensor`` ← (tensor − since) + newest in place: the progress kept, bit for bit."""
    return tensor.sub_(since).add_(newest)


def snapshot_into(slot: AdapterSlot, buffers: AdapterState) -> AdapterState:
    """The adapter's float32 snapshot: into ``buffers`` (reused) when the slot can, else a
    fresh copy. Empty ``buffers`` are filled with a first copy for the next time."""
    if not buffers:
        buffers.update(slot.state())
    elif isinstance(slot, InPlaceSlot):
        slot.copy_into(buffers)
    else:
        return slot.state()
    return buffers


def rebase_slot(slot: AdapterSlot, since: AdapterState, newest: AdapterState) -> None:
    """local ← (local − since) + newest: in place when the slot can, else through a copy."""
    if isinstance(slot, InPlaceSlot):
        slot.rebase(since, newest)
        return
    local = slot.state()
    for key, tensor in local.items():
        rebase_(tensor, since[key], newest[key])
    slot.load(local)


def check_keys(
    have: dict[str, torch.Tensor] | dict[str, torch.nn.Parameter], want: AdapterState
) -> None:
    """Refuse a state whose keys are not the slot's (nothing is written then)."""
    if have.keys() != want.keys():
        raise ValueError("adapter keys do not match the slot's tensors")


def each_tensor(tensors: Mapping[str, torch.Tensor], fn: Callable[[str], object]) -> None:
    """``fn(key)`` for every tensor, half of them (by size) on ``fedmoe.parallel``'s helper
    thread: the training thread waits half as long for a snapshot or a rebase."""
    keys = list(tensors)
    per_tensor(fn, keys, [tensors[key].numel() for key in keys])


class TensorSlot:
    """An ``InPlaceSlot`` over float32 tensors in host memory (benchmarks, simulations,
    tests): the host work of ``PeftAdapterSlot`` without a model."""

    def __init__(self) -> None:
        self.tensors: AdapterState = {}

    def state(self) -> AdapterState:
        """A float32 copy."""
        return {key: tensor.clone() for key, tensor in self.tensors.items()}

    def load(self, state: AdapterState) -> None:
        """Copy ``state`` into the tensors in place (the first load allocates them)."""
        if not self.tensors:
            self.tensors = {key: tensor.float().clone() for key, tensor in state.items()}
            return
        check_keys(self.tensors, state)
        for key, tensor in self.tensors.items():
            tensor.copy_(state[key])

    def copy_into(self, out: AdapterState) -> None:
        """Copy the tensors into ``out``'s."""
        check_keys(self.tensors, out)
        each_tensor(self.tensors, lambda key: out[key].copy_(self.tensors[key]))

    def rebase(self, since: AdapterState, newest: AdapterState) -> None:
        """t ← (t − since) + newest in place."""
        check_keys(self.tensors, since)
        each_tensor(self.tensors, lambda key: rebase_(self.tensors[key], since[key], newest[key]))

    def step(self, amount: float) -> None:
        """The arithmetic part of a fake training step: every tensor moves."""
        for tensor in self.tensors.values():
            tensor.add_(amount)
