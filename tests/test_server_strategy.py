"""Server strategies by hand: auto η, token factors, FedBuff, SGD/Nesterov/Adam steps,
and the strategy state's safetensors file (bit for bit)."""

from __future__ import annotations

import pytest
import torch

from fedmoe import aggregate
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.strategy_store import StrategyStore
from fedmoe.server_strategy import (
    AsyncStrategy,
    FedBuffStrategy,
    ServerOptimizer,
    StrategyState,
)
from tests.strategy_helpers import THETA, update


def test_auto_server_lr_and_token_factor() -> None:
    assert aggregate.auto_server_lr(1) == 1.0
    assert aggregate.auto_server_lr(4) == 0.25
    assert aggregate.auto_server_lr(0) == 1.0  # never more than one step
    assert aggregate.auto_server_lr(4, contributions=2) == 0.5
    assert aggregate.auto_server_lr(2, contributions=3) == 1.0
    assert aggregate.token_factor(300, 200.0) == 1.5
    assert aggregate.token_factor(0, 200.0) == 1.0  # unknown count: an average update


def test_default_async_strategy_is_todays_rule_bit_for_bit() -> None:
    strategy = AsyncStrategy(optimizer=ServerOptimizer(), server_lr=0.5)
    outcome = strategy.receive(THETA, update([10.0, -4.0], decay=1 / 1.2), StrategyState())
    weight = 0.5 * (1 / 1.2) * 1.0 * 1.0
    assert outcome.weight == weight
    assert outcome.params is not None and outcome.state.empty
    assert torch.equal(
        outcome.params["w"],
        aggregate.apply_update(THETA, {"w": torch.tensor([10.0, -4.0])}, weight)["w"],
    )


def test_auto_lr_async_moves_by_one_over_active_workers() -> None:
    strategy = AsyncStrategy(optimizer=ServerOptimizer(), server_lr="auto")
    outcome = strategy.receive(THETA, update([4.0, -2.0]), StrategyState())  # 2 active
    assert outcome.params is not None
    torch.testing.assert_close(outcome.params["w"], torch.tensor([3.0, 1.0]))


def test_fedbuff_buffers_then_applies_the_weighted_mean() -> None:
    strategy = FedBuffStrategy(optimizer=ServerOptimizer(), server_lr=1.0, buffer_size=2)
    first = strategy.receive(THETA, update([2.0, 4.0], uid="a", now=5.0), StrategyState())
    assert first.params is None and first.fill == 1
    assert first.state.update_ids == ("a",) and first.state.opened_at == 5.0
    torch.testing.assert_close(first.state.buffer["w"], torch.tensor([2.0, 4.0]))  # type: ignore[index]
    second = strategy.receive(THETA, update([4.0, 0.0], uid="b", decay=0.5), first.state)
    # mean of 1·[2, 4] and 0.5·[4, 0] over 2 updates = [2, 2]
    assert second.params is not None
    torch.testing.assert_close(second.params["w"], torch.tensor([3.0, 4.0]))
    assert second.state.buffer is None and second.state.update_ids == () and second.fill == 0
    assert second.weight == pytest.approx(0.25)  # η·s / mass = 1·0.5 / 2


def test_fedbuff_token_weights_and_timeout() -> None:
    strategy = FedBuffStrategy(optimizer=ServerOptimizer(), buffer_size=3, timeout=60.0)
    first = strategy.receive(THETA, update([4.0, 0.0], tokens=1.5, now=0.0), StrategyState())
    assert first.params is None
    not_due = strategy.receive(THETA, update([0.0, 4.0], tokens=0.5, now=59.0), first.state)
    assert not_due.params is None and not_due.fill == 2
    due = strategy.receive(THETA, update([0.0, 4.0], tokens=0.5, now=60.0), first.state)
    # (1.5·[4, 0] + 0.5·[0, 4]) / (1.5 + 0.5) = [3, 1]: a partial buffer after the timeout
    assert due.params is not None
    torch.testing.assert_close(due.params["w"], torch.tensor([4.0, 3.0]))


def test_nesterov_steps_match_diloco_by_hand() -> None:
    optimizer = ServerOptimizer(kind="nesterov", momentum=0.9)
    grad = {"w": torch.tensor([1.0, -1.0])}
    params, state = optimizer.step(THETA, grad, 0.7, StrategyState())
    # v = g; step = g + 0.9·v = 1.9·g; θ = θ + 0.7·1.9·g
    torch.testing.assert_close(params["w"], torch.tensor([2.33, 0.67]))
    assert state.steps == 1
    params, state = optimizer.step(params, grad, 0.7, state)
    # v = 0.9·g + g = 1.9·g; step = g + 0.9·1.9·g = 2.71·g; θ += 0.7·2.71·g
    torch.testing.assert_close(params["w"], torch.tensor([4.227, -1.227]))
    torch.testing.assert_close(state.first["w"], torch.tensor([1.9, -1.9]))  # type: ignore[index]


def test_sgd_momentum_and_adam_by_hand() -> None:
    grad = {"w": torch.tensor([0.1, -0.2])}
    sgd = ServerOptimizer(kind="sgd", momentum=0.5)
    params, state = sgd.step(THETA, grad, 1.0, StrategyState())
    params, state = sgd.step(params, grad, 1.0, state)  # v = 1.5·g: θ + g + 1.5·g
    torch.testing.assert_close(params["w"], torch.tensor([1.25, 1.5]))
    adam = ServerOptimizer(kind="adam", momentum=0.9, eps=1e-3)
    params, state = adam.step(THETA, grad, 0.01, StrategyState())
    # m = 0.1·g, v = 0.01·g², step = m / (√v + ε) = 0.1g / (0.1|g| + 1e-3)
    expected = [1 + 0.01 * 0.01 / (0.01 + 1e-3), 2 - 0.01 * 0.02 / (0.02 + 1e-3)]
    torch.testing.assert_close(params["w"], torch.tensor(expected))
    torch.testing.assert_close(state.second["w"], torch.tensor([1e-4, 4e-4]))  # type: ignore[index]


def test_optimizer_and_buffer_refuse_bad_parameters() -> None:
    with pytest.raises(ValueError, match="server optimizer"):
        ServerOptimizer(kind="lamb")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum"):
        ServerOptimizer(momentum=1.0)
    with pytest.raises(ValueError, match="buffer size"):
        FedBuffStrategy(optimizer=ServerOptimizer(), buffer_size=0)


def test_state_file_round_trips_bit_for_bit(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    tensor = lambda: {"a.lora_A.weight": torch.randn(3, 5, generator=generator)}  # noqa: E731
    state = StrategyState(
        buffer=tensor(),
        mass=1.0 / 3.0,
        update_ids=("x", "y"),
        opened_at=1764340000.123456,
        first=tensor(),
        second=tensor(),
        steps=7,
    )
    store = StrategyStore(tmp_path)
    store.save("sql", 4, state)
    (tmp_path / "strategy" / "sql.s0000000003.safetensors").write_bytes(b"old")
    loaded = store.load("sql", 4)
    assert (loaded.mass, loaded.update_ids, loaded.opened_at, loaded.steps) == (
        state.mass,
        state.update_ids,
        state.opened_at,
        state.steps,
    )
    for name in ("buffer", "first", "second"):
        key = "a.lora_A.weight"
        assert torch.equal(getattr(loaded, name)[key], getattr(state, name)[key])
    store.prune("sql", 4)
    assert [p.name for p in (tmp_path / "strategy").iterdir()] == ["sql.s0000000004.safetensors"]


def test_settings_strategy_options(tmp_path) -> None:
    auto = CoordinatorSettings(server_lr="auto", state_dir=tmp_path)
    assert auto.effective_server_lr == "auto"
    diloco = CoordinatorSettings(server_optimizer="nesterov", state_dir=tmp_path)
    assert (diloco.effective_server_lr, diloco.effective_server_momentum) == (0.7, 0.9)
    assert CoordinatorSettings(state_dir=tmp_path).effective_server_lr == "auto"
    with pytest.raises(ValueError, match="no effect without strategy 'fedbuff'"):
        CoordinatorSettings(buffer_size=4, state_dir=tmp_path)
    with pytest.raises(ValueError, match="server_lr"):
        CoordinatorSettings(server_lr=0.0, state_dir=tmp_path)
