"""--server-lr agree by hand: the agreement of the recent directions, the η it gives, the
strategy's state (folded count) through a snapshot, and what the settings refuse."""

from __future__ import annotations

import math

import pytest
import torch

from fedmoe import aggregate, robust_aggregate
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.strategy_store import StrategyStore
from fedmoe.screen_strategy import ScreenedAsyncStrategy, ScreenOptions
from fedmoe.server_strategy import (
    AsyncStrategy,
    Contribution,
    FedBuffStrategy,
    ServerOptimizer,
    StrategyState,
)
from tests.strategy_helpers import THETA, update

E1, E2 = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}


def averaged(*directions: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    average = None
    for d in directions:
        average = robust_aggregate.direction_average(average, d, aggregate.global_norm(d), keep)
    assert average is not None
    return average


def test_ema_weight_sums_by_hand() -> None:
    # keep 0.5, two entries: weights 0.5 (newest) and 0.25
    assert aggregate.ema_weight_sums(2, 0.5) == (0.75, 0.3125)
    assert aggregate.ema_weight_sums(0, 0.5) == (0.0, 0.0)


def test_agreement_is_the_mean_pairwise_cosine() -> None:
    same = averaged(E1, E1, keep=0.5)  # 0.75·e1: ‖D‖² 0.5625, Σw² 0.3125, (Σw)² 0.5625
    assert aggregate.agreement(same, 2, 0.5) == pytest.approx(1.0)
    orthogonal = averaged(E1, E2, keep=0.5)  # 0.25·e1 + 0.5·e2: ‖D‖² 0.3125 = Σw²
    assert aggregate.agreement(orthogonal, 2, 0.5) == pytest.approx(0.0, abs=1e-7)
    flipped = averaged(E1, {"w": -E1["w"]}, keep=0.5)  # -0.25·e1: (0.0625 - 0.3125) / 0.25
    assert aggregate.agreement(flipped, 2, 0.5) == pytest.approx(-1.0)
    sixty = {"w": torch.tensor([0.5, math.sqrt(3) / 2])}  # cos 0.5 to e1
    assert aggregate.agreement(averaged(E1, sixty, keep=0.5), 2, 0.5) == pytest.approx(0.5)
    assert aggregate.agreement(averaged(E1, keep=0.5), 1, 0.5) == 0.0  # no pair yet
    assert aggregate.agreement(None, 5, 0.5) == 0.0


def test_agreement_server_lr_is_the_sums_share_of_the_norms() -> None:
    assert aggregate.agreement_server_lr(1, -1.0) == 1.0  # a lone worker: its delta
    assert aggregate.agreement_server_lr(0, 0.3) == 1.0
    assert aggregate.agreement_server_lr(4, 0.0) == 0.25  # noise: the mean
    assert aggregate.agreement_server_lr(4, -0.5) == 0.25
    assert aggregate.agreement_server_lr(4, 1.0) == 1.0  # agreement: the sum
    assert aggregate.agreement_server_lr(4, 3.0) == 1.0
    assert aggregate.agreement_server_lr(4, 0.5) == 0.625
    # two unit deltas at cosine 0.6: ‖a + b‖² / (2·(‖a‖² + ‖b‖²)) = 3.2 / 4
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])
    share = float((a + b).square().sum()) / (2 * float(a.square().sum() + b.square().sum()))
    assert aggregate.agreement_server_lr(2, 0.6) == pytest.approx(share)


def test_a_lone_worker_is_applied_plainly_and_keeps_no_direction() -> None:
    strategy = AsyncStrategy(optimizer=ServerOptimizer(), server_lr="agree")
    outcome = strategy.receive(THETA, update([4.0, -2.0], workers=1, worker="a"), StrategyState())
    assert outcome.weight == 1.0 and outcome.state.empty
    assert outcome.params is not None
    assert torch.equal(outcome.params["w"], THETA["w"] + torch.tensor([4.0, -2.0]))


def test_agreeing_deltas_move_from_the_mean_towards_the_sum() -> None:
    strategy = AsyncStrategy(optimizer=ServerOptimizer(), server_lr="agree")
    keep = 1.0 - 1.0 / 16
    state, params, weights = StrategyState(), THETA, []
    for worker in ("a", "b", "a"):  # the same direction three times, two workers active
        outcome = strategy.receive(params, update([3.0, 4.0], workers=2, worker=worker), state)
        assert outcome.params is not None
        params, state = outcome.params, outcome.state
        weights.append(outcome.weight)
    # no pair before the third: η = 1/2; then c = 1: η = 1/2 + 1/2·1 (to float rounding)
    assert weights[:2] == [0.5, 0.5]
    assert weights[2] == pytest.approx(1.0)
    assert state.folded == 3
    unit = torch.tensor([0.6, 0.8])
    torch.testing.assert_close(state.direction["w"], (1 - keep**3) * unit)
    torch.testing.assert_close(params["w"], THETA["w"] + (0.5 + 0.5 + weights[2]) * 5 * unit)


def test_the_screen_shares_its_direction_with_agree() -> None:
    screen = ScreenOptions(history=4)
    strategy = ScreenedAsyncStrategy(optimizer=ServerOptimizer(), screen=screen, server_lr="agree")
    state = StrategyState()
    for worker in ("a", "b", "c"):
        outcome = strategy.receive(THETA, update([3.0, 4.0], workers=3, worker=worker), state)
        state = outcome.state
    # "a" was alone in the history: its direction was not kept; "b" and "c" were folded once
    assert state.folded == 2
    torch.testing.assert_close(state.direction["w"], (1 - 0.75**2) * torch.tensor([0.6, 0.8]))
    assert outcome.weight == pytest.approx(1 / 3)  # c needs a pair: the third saw one entry
    fourth = strategy.receive(THETA, update([3.0, 4.0], workers=3, worker="a"), state)
    assert fourth.weight == pytest.approx(1.0)


def test_the_folded_count_survives_a_snapshot(tmp_path) -> None:
    state = StrategyState(direction={"a.lora_A.weight": torch.ones(2, 3) / 7}, folded=5)
    state = state.__class__(**{**state.__dict__, "recent": (("w", 0.5, True),)})
    store = StrategyStore(tmp_path)
    store.save("sql", 9, state)
    loaded = store.load("sql", 9)
    assert loaded.folded == 5 and loaded.recent == state.recent
    assert torch.equal(loaded.direction["a.lora_A.weight"], state.direction["a.lora_A.weight"])
    tensors, scalars = (
        StrategyState(direction=state.direction).tensors(),
        {"fedmoe_strategy_state": '{"mass": 0.0, "update_ids": [], "opened_at": null, "steps": 0}'},
    )
    older = StrategyState.from_parts(tensors, scalars)  # a direction kept before the count
    assert aggregate.ema_weight_sums(older.folded, 0.5) == (1.0, 1.0 / 3.0)


def test_agree_is_for_the_async_strategy_only(tmp_path) -> None:
    assert CoordinatorSettings(state_dir=tmp_path, server_lr="agree").effective_server_lr == "agree"
    with pytest.raises(ValueError, match="'async' only"):
        CoordinatorSettings(state_dir=tmp_path, server_lr="agree", strategy="fedbuff")
    with pytest.raises(ValueError, match="'async' strategy only"):
        FedBuffStrategy(optimizer=ServerOptimizer(), server_lr="agree")


def test_mean_server_lr_undoes_the_decay_at_the_typical_staleness() -> None:
    assert aggregate.typical_staleness(4) == 3 and aggregate.typical_staleness(0) == 0
    assert aggregate.mean_server_lr(1, 0.5) == 1.0  # a lone worker: its delta
    assert aggregate.mean_server_lr(4, 1 / 1.3) == pytest.approx(0.325)  # inverse a=0.1
    assert aggregate.mean_server_lr(2, 1.0) == 0.5  # constant s: 1/K, as 'auto'
    assert aggregate.mean_server_lr(4, 0.1) == 1.0  # never more than the delta
    assert aggregate.mean_server_lr(4, 0.0) == 0.25
    strategy = AsyncStrategy(optimizer=ServerOptimizer(), server_lr="mean")
    typical = Contribution(
        update_id="u",
        delta={"w": torch.tensor([4.0, -2.0])},
        decay=1 / 1.3,  # s(3): the typical staleness of 4 workers
        clip=1.0,
        token_factor=1.0,
        active_workers=4,
        now=0.0,
        typical_decay=1 / 1.3,
    )
    outcome = strategy.receive(THETA, typical, StrategyState())
    assert outcome.weight == pytest.approx(0.25) and outcome.state.empty
    assert not strategy.stateful


def test_mean_is_for_the_async_strategy_only(tmp_path) -> None:
    with pytest.raises(ValueError, match="'async' only"):
        CoordinatorSettings(state_dir=tmp_path, server_lr="mean", strategy="fedbuff")
    with pytest.raises(ValueError, match="'async' strategy only"):
        FedBuffStrategy(optimizer=ServerOptimizer(), server_lr="mean")
