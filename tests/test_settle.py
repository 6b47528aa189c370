"""An update's acknowledgement does not wait for the update screen's direction average
(``UpdatePath._settle`` finishes it after, under the expert's lock): the next update is
judged with it, and an expert whose average could not be finished refuses updates until a
restart recomputes it from the write-ahead log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedmoe import server_strategy
from fedmoe.adapters import encode_adapter
from fedmoe.coordinator.bootstrap import open_coordinator, register_in_process
from fedmoe.coordinator.errors import ExpertUnavailableError
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.versions import UpdateRequest
from fedmoe.schemas import UpdateAck
from fedmoe.screen_strategy import ScreenedAsyncStrategy

SQL = "sql_expert"


def _settings(state_dir: Path) -> CoordinatorSettings:
    return CoordinatorSettings(
        host="127.0.0.1", state_dir=state_dir, experts=[SQL], auth_token=None
    )


def _submit(coordinator: Any, seed: int, worker: str) -> UpdateAck:
    generator = torch.Generator().manual_seed(seed)
    delta = {k: torch.randn(s, generator=generator) * 1e-2 for k, s in coordinator.schema.items()}
    body = encode_adapter(delta, dtype=torch.bfloat16)
    version = coordinator.experts[SQL].version
    return coordinator.submit_update(UpdateRequest(SQL, worker, f"u{seed}", version, 10, 1.0, body))


def test_each_update_finds_the_previous_ones_direction_averaged_in(tmp_path: Path) -> None:
    coordinator = open_coordinator(_settings(tmp_path))
    try:
        assert isinstance(coordinator.strategies.strategy, ScreenedAsyncStrategy)  # the default
        for worker in "ab":
            register_in_process(coordinator, worker, SQL)
        for seed in range(4):
            _submit(coordinator, seed, "ab"[seed % 2])
        # a's first update came before anyone else's: nothing to fold; every later one folds
        assert coordinator.strategy_state(SQL).folded == 3
    finally:
        coordinator.close()


def test_an_expert_whose_state_could_not_be_finished_waits_for_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator = open_coordinator(_settings(tmp_path))
    for worker in "ab":
        register_in_process(coordinator, worker, SQL)
    _submit(coordinator, 0, "a")

    def out_of_memory(*args: Any) -> Any:
        raise MemoryError("no room for the direction average")

    monkeypatch.setattr(server_strategy, "fold_direction", out_of_memory)
    acknowledged = _submit(coordinator, 1, "b")  # applied and logged; its average fails after
    assert acknowledged.version == 2
    monkeypatch.undo()
    with pytest.raises(ExpertUnavailableError, match="restart the coordinator"):
        _submit(coordinator, 2, "a")
    assert coordinator.experts[SQL].version == 2  # nothing else changed
    coordinator.close()  # its snapshot comes from the log, not from the unfinished state

    reopened = open_coordinator(_settings(tmp_path))
    try:
        assert reopened.experts[SQL].version == 2
        assert reopened.strategy_state(SQL).folded == 1  # b's update, averaged in by replay
        assert _submit(reopened, 2, "a").version == 3
    finally:
        reopened.close()
