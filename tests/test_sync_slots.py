"""Snapshots into reused buffers and the in-place rebase (issue 13: blocked time at 7B).

The rebase must stay the rule bit for bit, (local − since) + newest, whether a slot does it
in place (``TensorSlot``, the worker's ``PeftAdapterSlot`` with float32 or bfloat16 LoRA
weights) or through ``state``/``load``; the ``Syncer`` snapshots every sync into the same
buffers, and what an upload carries is the adapter at capture time even when training
moves on while the exchange is in flight.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
import torch

import fedmoe.parallel
from fedmoe.adapters import decode_adapter, schema_of
from fedmoe.aggregate import AdapterState, apply_update
from fedmoe.config import LoraSettings
from fedmoe.deltas import ExpertChanges
from fedmoe.modeling import attach_lora, load_base_model
from fedmoe.schemas import RegistrationAck, UpdateAck
from fedmoe.state_digest import state_digest
from fedmoe.worker.peft_slot import PeftAdapterSlot
from fedmoe.worker.progress import WorkerStats
from fedmoe.worker.slots import TensorSlot, rebase_slot, snapshot_into
from fedmoe.worker.sync import Syncer
from fedmoe.worker.sync_seams import SyncIdentity, SystemClock


def random_state(seed: int, scale: float = 1.0) -> AdapterState:
    """Float32 tensors with values over many magnitudes (so rounding order matters)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"a.lora_A.weight": (4, 64), "a.lora_B.weight": (64, 4), "b.lora_A.weight": (8,)}
    return {
        key: torch.randn(shape, generator=generator) * scale * 10 ** torch.randint(-6, 6, shape)
        for key, shape in shapes.items()
    }


def the_rule(local: AdapterState, since: AdapterState, newest: AdapterState) -> AdapterState:
    """(local − since) + newest, out of place: what every slot must produce."""
    return {key: (local[key] - since[key]) + newest[key] for key in local}


def assert_bits(actual: AdapterState, expected: AdapterState) -> None:
    """Bit-for-bit equality."""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


class PlainSlot:
    """A slot with only ``state``/``load`` (as the unit tests' fakes are)."""

    def __init__(self, state: AdapterState) -> None:
        self.tensors = {key: tensor.clone() for key, tensor in state.items()}

    def state(self) -> AdapterState:
        """A copy."""
        return {key: tensor.clone() for key, tensor in self.tensors.items()}

    def load(self, state: AdapterState) -> None:
        """Replace the tensors."""
        self.tensors = {key: tensor.clone() for key, tensor in state.items()}


@pytest.mark.parametrize("threads", [1, 2])
def test_in_place_and_copying_rebases_are_the_rule_bit_for_bit(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if threads == 2:  # these small tensors too: half of them on the helper thread
        monkeypatch.setattr(fedmoe.parallel, "MIN_ELEMENTS", 0)
    local, since, newest = random_state(1), random_state(2), random_state(3)
    expected = the_rule(local, since, newest)
    # newest + (local − since) (a precomputed correction) rounds differently somewhere
    other = {key: local[key] + (newest[key] - since[key]) for key in local}
    assert any(not torch.equal(other[key], expected[key]) for key in expected)
    slot = TensorSlot()
    slot.load(local)
    tensors = dict(slot.tensors)
    rebase_slot(slot, since, newest)
    assert_bits(slot.tensors, expected)
    assert all(slot.tensors[key] is tensors[key] for key in tensors), "not in place"
    plain = PlainSlot(local)
    rebase_slot(plain, since, newest)
    assert_bits(plain.tensors, expected)
    with pytest.raises(ValueError, match="keys"):
        slot.rebase({"other": torch.zeros(1)}, newest)
    assert_bits(slot.tensors, expected)  # a refused state changed nothing


def test_snapshots_reuse_their_buffers_and_plain_slots_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fedmoe.parallel, "MIN_ELEMENTS", 0)
    slot, buffers = TensorSlot(), {}
    slot.load(random_state(4))
    first = snapshot_into(slot, buffers)  # empty buffers: allocated by this first copy
    pointers = {key: tensor.data_ptr() for key, tensor in first.items()}
    slot.step(0.5)
    second = snapshot_into(slot, buffers)
    assert second is buffers and {k: t.data_ptr() for k, t in second.items()} == pointers
    assert_bits(second, slot.tensors)
    assert all(second[key] is not slot.tensors[key] for key in second)
    plain = PlainSlot(random_state(5))
    copy = snapshot_into(plain, buffers)
    assert copy is not buffers
    assert_bits(copy, plain.tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_workers_peft_slot_snapshots_and_rebases_like_state_and_load(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fedmoe.parallel, "MIN_ELEMENTS", 0)  # the helper thread takes half
    model = attach_lora(load_base_model("tiny", device="cpu").model, LoraSettings())
    model.to(dtype)
    slot = PeftAdapterSlot(model)
    local = slot.state()
    buffers = {key: torch.full_like(tensor, 7.0) for key, tensor in local.items()}
    slot.copy_into(buffers)
    assert_bits(buffers, local)
    since = {key: tensor + 1e-3 for key, tensor in local.items()}
    newest = {key: tensor * 0.5 + 2e-3 for key, tensor in local.items()}
    # the path before in-place rebases: float32 copy, the rule, load (cast back)
    reference = PeftAdapterSlot(copy.deepcopy(model))
    reference.load(the_rule(local, since, newest))
    slot.rebase(since, newest)
    assert_bits(slot.state(), reference.state())


class GatedCoordinator:
    """A one-expert ``SyncClient``: θ ← θ + Δ at weight 1, uploads held until ``gate``."""

    def __init__(self, initial: AdapterState) -> None:
        self.state, self.version = {k: t.clone() for k, t in initial.items()}, 0
        self.gate = threading.Event()
        self.deltas: list[AdapterState] = []

    def register(self, **registration: Any) -> RegistrationAck:
        """Always admitted."""
        return RegistrationAck(
            worker_id=registration["worker_id"],
            specialty=registration["specialty"],
            expert_version=self.version,
            run_id="run",
        )

    def expert_adapter(self, name: str, schema: Any) -> tuple[int, AdapterState]:
        """The newest expert."""
        return self.version, {k: t.clone() for k, t in self.state.items()}

    def expert_changes(self, name: str, schema: Any, since: int, exclude: Any) -> ExpertChanges:
        """Never used by a sole worker (its acknowledgement is enough)."""
        raise AssertionError("a sole worker rebuilds from its acknowledgement")

    def upload(self, expert: str, body: bytes, *, update_id: str, **_: Any) -> UpdateAck:
        """Apply Δ once the test opens the gate."""
        assert self.gate.wait(10), "the test never opened the gate"
        delta = decode_adapter(body, schema_of(self.state))
        self.deltas.append(delta)
        self.state, self.version = apply_update(self.state, delta, 1.0), self.version + 1
        return UpdateAck(
            update_id=update_id,
            expert=expert,
            version=self.version,
            staleness=0,
            weight=1.0,
            update_norm=0.0,
            clipped=False,
            gateway_version=self.version,
            replayed=False,
            state_sha256=state_digest(self.state),
        )

    def close(self) -> None:
        """Nothing to release."""


def test_background_syncs_capture_into_the_same_buffers_and_keep_in_flight_steps() -> None:
    initial = random_state(6, scale=1e-3)
    coordinator, slot, stats = GatedCoordinator(initial), TensorSlot(), WorkerStats()
    identity = SyncIdentity("w", "e", "fp", {}, schema_of(initial), torch.float32)
    syncer = Syncer(
        coordinator, slot, identity, stats=stats, clock=SystemClock(), sync_interval=0.0,
        max_backoff=1.0,
    )  # fmt: skip
    syncer.register()
    syncer.pull_and_reset()
    pointers = None
    for round_ in range(3):
        slot.step(0.25)
        stats.window_tokens = 10
        captured = {key: tensor.clone() for key, tensor in slot.tensors.items()}
        syncer.start()
        slot.step(0.125)  # trained while the exchange is in flight (the buffers are not)
        in_flight = {key: tensor.clone() for key, tensor in slot.tensors.items()}
        coordinator.gate.set()
        assert syncer.wait() is True
        coordinator.gate.clear()
        assert_bits(coordinator.deltas[-1], {k: captured[k] - initial[k] for k in captured})
        pending_snapshot = coordinator.state  # weight 1, float32: the snapshot, bit for bit
        assert_bits(syncer.pulled, coordinator.state)
        assert_bits(slot.tensors, the_rule(in_flight, pending_snapshot, coordinator.state))
        now = {key: tensor.data_ptr() for key, tensor in syncer._buffers.items()}
        assert pointers is None or now == pointers, f"round {round_}: buffers reallocated"
        pointers, initial = now, coordinator.state
    syncer.close()
