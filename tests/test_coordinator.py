"""CentralCoordinator in process: parallel updates to several experts, and its files."""

from __future__ import annotations

import ctypes
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmoe import aggregate
from fedmoe.adapters import encode_adapter, read_header, view_adapter
from fedmoe.coordinator.bootstrap import open_coordinator, register_in_process
from fedmoe.coordinator.errors import StateDirError
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.versions import UpdateRequest
from fedmoe.schemas import UpdateAck

EXPERTS = ["a", "a.v2", "b"]  # "a.v2" also checks that pruning "a" leaves it alone


def _settings(state_dir: Path, **extra: Any) -> CoordinatorSettings:
    return CoordinatorSettings(
        host="127.0.0.1", state_dir=state_dir, experts=EXPERTS, auth_token=None, **extra
    )


def _delta(coordinator, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=generator) * 1e-3
        for key, shape in coordinator.schema.items()
    }


def test_parallel_updates_to_several_experts_lose_nothing(tmp_path: Path) -> None:
    coordinator = open_coordinator(_settings(tmp_path))
    for name in EXPERTS:
        register_in_process(coordinator, f"w-{name}", name)
    initial = {name: dict(coordinator.experts[name].state) for name in EXPERTS}
    jobs = [(name, seed) for seed in range(8) for name in EXPERTS]

    def submit(job: tuple[str, int]) -> UpdateAck:
        name, seed = job
        request = UpdateRequest(
            expert=name,
            worker_id=f"w-{name}",
            update_id=uuid.uuid4().hex,
            base_version=0,
            num_tokens=10,
            train_loss=1.0,
            body=encode_adapter(_delta(coordinator, seed)),
        )
        return coordinator.submit_update(request)

    with ThreadPoolExecutor(max_workers=6) as pool:
        acks = list(pool.map(submit, jobs))
    coordinator.close()

    assert coordinator.gateway.version == len(jobs)
    assert sorted(ack.gateway_version for ack in acks) == list(range(1, len(jobs) + 1))
    for name in EXPERTS:
        mine = [ack for ack, (expert, _) in zip(acks, jobs) if expert == name]
        assert sorted(ack.version for ack in mine) == list(range(1, 9))
        expected = dict(initial[name])
        for ack, (expert, seed) in zip(acks, jobs):
            if expert == name:
                expected = aggregate.apply_update(expected, _delta(coordinator, seed), ack.weight)
        restored = open_coordinator(_settings(tmp_path))
        try:
            state = restored.experts[name].state
            assert restored.experts[name].version == 8
            # float32 sums in another order: equal up to rounding
            assert all(torch.allclose(state[k], expected[k], atol=1e-6) for k in state)
        finally:
            restored.close()
    files = sorted(p.name for p in (tmp_path / "adapters").glob("*.safetensors"))
    # the gateway is merged lazily: nobody downloaded it, so no gateway file was written
    assert files == sorted(f"{n}.v{8:010d}.safetensors" for n in EXPERTS)


def test_view_adapter_shares_memory_with_the_bytes() -> None:
    state = {"x.lora_A.weight": torch.randn(4, 6), "x.lora_B.weight": torch.randn(9, 4)}
    payload = encode_adapter(state, {"name": "x"})
    views = view_adapter(payload)
    assert all(torch.equal(views[key], state[key]) for key in state)
    start = ctypes.cast(ctypes.c_char_p(payload), ctypes.c_void_p).value
    for tensor in views.values():  # inside the payload's buffer: no copy was made
        assert start <= tensor.data_ptr() < start + len(payload)
    with pytest.raises(ValueError, match="expected F32"):
        view_adapter(encode_adapter(state, dtype=torch.bfloat16))


def test_a_corrupt_or_missing_expert_file_stops_the_start_with_its_path(tmp_path: Path) -> None:
    open_coordinator(_settings(tmp_path)).close()
    path = tmp_path / "adapters" / f"b.v{0:010d}.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StateDirError, match=r"cannot restore expert b v0 from .*b\.v0+\.safe"):
        open_coordinator(_settings(tmp_path))
    path.unlink()
    with pytest.raises(StateDirError, match="the file is missing"):
        open_coordinator(_settings(tmp_path))


def test_gateway_file_is_written_at_most_once_per_interval_and_on_close(tmp_path: Path) -> None:
    coordinator = open_coordinator(
        _settings(tmp_path, gateway_file_interval=60.0, eager_gateway=True)
    )
    register_in_process(coordinator, "w", "b")
    gateway_file = tmp_path / "adapters" / "gateway.safetensors"

    def saved_version() -> int:
        return int(read_header(gateway_file.read_bytes())["__metadata__"]["version"])

    def submit(seed: int) -> UpdateAck:
        body = encode_adapter(_delta(coordinator, seed))
        request = UpdateRequest("b", "w", f"u{seed}", seed, 1, 1.0, body)
        return coordinator.submit_update(request)

    deadline = time.monotonic() + 30
    while not gateway_file.exists():  # the opening version is written at once
        assert time.monotonic() < deadline, "gateway file never written"
        time.sleep(0.05)
    assert saved_version() == 0
    acks = [submit(seed) for seed in range(5)]
    assert acks[-1].gateway_version == coordinator.gateway.version == 5
    time.sleep(0.5)
    assert saved_version() == 0  # the writer waits out its interval
    began = time.monotonic()
    coordinator.close()
    assert time.monotonic() - began < 30, "close() must not wait out the interval"
    assert saved_version() == 5  # the newest version is written on close
