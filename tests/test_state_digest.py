"""``state_sha256``: the digest of an expert's tensors, and the coordinator's acknowledgement.

A worker that was the only sender since its pull rebuilds the new expert from the
acknowledgement; the digest is what makes that safe, so it must change with any bit, name
or shape, and the coordinator must compute it over exactly the state it serves.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import torch

from fedmoe.adapters import encode_adapter
from fedmoe.aggregate import apply_update
from fedmoe.coordinator.bootstrap import open_coordinator
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.versions import UpdateRequest
from fedmoe.schemas import LoraConfigBody, UpdateAck, WorkerRegistration
from fedmoe.state_digest import state_digest

A, B = "x.lora_A.weight", "x.lora_B.weight"


def test_the_digest_changes_with_any_bit_name_or_shape() -> None:
    state = {A: torch.tensor([[1.0, 2.0]]), B: torch.zeros(2, 1)}
    digest = state_digest(state)
    assert digest == state_digest({B: state[B].clone(), A: state[A].clone()})  # order-free
    flipped = state[A].clone()
    flipped.view(torch.int32)[0, 1] ^= 1  # one bit of one float
    assert state_digest({A: flipped, B: state[B]}) != digest
    assert state_digest({A: state[A].reshape(2, 1), B: state[B]}) != digest
    assert state_digest({"y.lora_A.weight": state[A], B: state[B]}) != digest
    assert state_digest({A: state[A], B: torch.tensor([[-0.0], [0.0]])}) != digest  # -0.0


def test_the_acknowledgement_carries_the_digest_of_the_new_expert(tmp_path: Path) -> None:
    settings = CoordinatorSettings(
        host="127.0.0.1", state_dir=tmp_path, experts=["e"], auth_token=None, server_lr=0.75
    )
    coordinator = open_coordinator(settings)
    for worker in ("w1", "w2"):
        coordinator.register_worker(
            WorkerRegistration(
                worker_id=worker,
                specialty="e",
                base_model_fingerprint=coordinator.fingerprint,
                lora_config=LoraConfigBody.model_validate(coordinator.lora.to_dict()),
            )
        )
    pulled = dict(coordinator.experts["e"].state)
    delta = {key: torch.full(shape, 1e-3) for key, shape in coordinator.schema.items()}
    body = encode_adapter(delta, dtype=torch.bfloat16)

    def submit(worker: str, update_id: str, base: int) -> UpdateAck:
        request = UpdateRequest("e", worker, update_id, base, 10, 1.0, body)
        return coordinator.submit_update(request)

    ack = submit("w1", "u1", 0)
    served = coordinator.experts["e"].state
    assert ack.state_sha256 == state_digest(served)
    # what the worker does: pulled + weight·Δ (as sent) reproduces it bit for bit
    rebuilt = apply_update(pulled, {k: d.bfloat16().float() for k, d in delta.items()}, ack.weight)
    assert state_digest(rebuilt) == ack.state_sha256 and ack.weight == 0.75
    assert submit("w1", "u1", 0) == ack.model_copy(update={"replayed": True})  # the first answer
    stale = submit("w2", uuid.uuid4().hex, 0)  # staleness 1: the sender must pull anyway
    assert stale.staleness == 1 and stale.state_sha256 is None
    coordinator.close()
