"""Robust aggregation: the pure functions against hand-computed values, and the robust
FedBuff strategy's verdicts and durable state."""

from __future__ import annotations

import pytest
import torch

from fedmoe import aggregate, robust_aggregate
from fedmoe.robust_strategy import RobustBuffStrategy, RobustOptions
from fedmoe.server_strategy import Contribution, ServerOptimizer, StrategyState

KEY = "layer.lora_A.weight"


def _s(*values: float) -> dict[str, torch.Tensor]:
    return {KEY: torch.tensor(values, dtype=torch.float32)}


def test_median_and_trimmed_mean_by_hand() -> None:
    members = [_s(1, 10), _s(2, -5), _s(3, 0), _s(100, 1)]
    median, shares = robust_aggregate.coordinate_median(members)
    torch.testing.assert_close(median[KEY], torch.tensor([2.5, 0.5]))
    # coordinate 0 keeps 2 and 3, coordinate 1 keeps 0 and 1: (1, 10) is dropped in both
    assert shares == [1.0, 0.5, 0.0, 0.5]
    odd, shares = robust_aggregate.coordinate_median(members[:3])
    torch.testing.assert_close(odd[KEY], torch.tensor([2.0, 0.0]))
    assert shares == [1.0, 0.5, 0.5]  # (1, 10) is the median in neither coordinate
    trimmed, _ = robust_aggregate.trimmed_mean([_s(v) for v in (1, 2, 3, 4, 50)], 1)
    torch.testing.assert_close(trimmed[KEY], torch.tensor([3.0]))
    untrimmed, shares = robust_aggregate.trimmed_mean(members, 0)
    torch.testing.assert_close(untrimmed[KEY], torch.tensor([26.5, 1.5]))
    assert shares == [0.0] * 4
    with pytest.raises(ValueError, match="cannot trim 2"):
        robust_aggregate.trimmed_mean(members, 2)


def test_outlier_test_rejects_scaled_and_flipped_updates() -> None:
    clean = [_s(1.0, 1.0, 0.5), _s(1.2, 0.8, 0.4), _s(0.9, 1.1, 0.6)]
    assert robust_aggregate.outlier_reasons(clean, norm_factor=3) == [None, None, None]
    scaled = [*clean, _s(100.0, 100.0, 50.0)]
    reasons = robust_aggregate.outlier_reasons(scaled, norm_factor=3)
    assert reasons[:3] == [None] * 3 and reasons[3] is not None and "norm" in reasons[3]
    flipped = [*clean, _s(-1.0, -1.0, -0.5)]
    reasons = robust_aggregate.outlier_reasons(flipped, norm_factor=3)
    assert reasons[:3] == [None] * 3 and reasons[3] is not None and "cosine" in reasons[3]
    assert robust_aggregate.outlier_reasons(flipped[2:], norm_factor=3) == [
        None,
        None,
    ]  # no majority
    assert aggregate.cosine(_s(1, 0), _s(0, 2)) == 0.0
    assert aggregate.cosine(_s(1, 1), _s(-2, -2)) == pytest.approx(-1.0)


def _feed(strategy: RobustBuffStrategy, deltas: list[dict[str, torch.Tensor]]):
    params, state = _s(0.0, 0.0, 0.0), StrategyState()
    outcome = None
    for index, delta in enumerate(deltas):
        update = Contribution(f"u{index}", delta, 1.0, 1.0, 1.0, 1, float(index))
        outcome = strategy.receive(params, update, state)
        state = outcome.state
    assert outcome is not None
    return outcome


def _robust(**options: object) -> RobustBuffStrategy:
    return RobustBuffStrategy(
        optimizer=ServerOptimizer(),
        robust=RobustOptions(**options),
        buffer_size=4,  # type: ignore[arg-type]
    )


def test_robust_buffer_steps_along_the_median_and_records_verdicts() -> None:
    deltas = [_s(1.0, 1.0, 0.5), _s(1.2, 0.8, 0.4), _s(0.9, 1.1, 0.6), _s(-100.0, -90.0, -40.0)]
    plain = _feed(_robust(aggregation="none", outlier_test=False), deltas[:3])
    assert plain.params is None and plain.fill == 3  # buffered, each update apart
    assert len(plain.state.members) == 3
    median = _feed(_robust(aggregation="median"), deltas)
    assert median.params is not None
    torch.testing.assert_close(median.params[KEY], torch.tensor([0.95, 0.9, 0.45]))
    assert [v[:2] for v in median.state.verdicts] == [("u3", "down-weighted")]
    assert median.state.members == () and median.state.update_ids == ()
    tested = _feed(_robust(aggregation="none", outlier_test=True), deltas)
    assert tested.params is not None
    torch.testing.assert_close(
        tested.params[KEY], torch.tensor([1.0333, 0.9667, 0.5]), atol=1e-4, rtol=0
    )
    assert [v[:2] for v in tested.state.verdicts] == [("u3", "rejected")]
    assert tested.weight == 0.0  # the update that filled the buffer was itself rejected


def test_robust_state_round_trips_through_safetensors_parts() -> None:
    outcome = _feed(_robust(aggregation="trimmed_mean"), [_s(1.0, 2.0, 3.0), _s(4.0, 5.0, 6.0)])
    state = outcome.state
    again = StrategyState.from_parts(state.tensors(), state.scalars())
    assert again.update_ids == state.update_ids and again.member_weights == (1.0, 1.0)
    for mine, theirs in zip(state.members, again.members):
        assert torch.equal(mine[KEY], theirs[KEY])
    done = _feed(_robust(aggregation="median"), [_s(1.0), _s(2.0), _s(3.0), _s(-50.0)]).state
    assert StrategyState.from_parts(done.tensors(), done.scalars()).verdicts == done.verdicts
    with pytest.raises(ValueError, match="trim fraction"):
        RobustOptions(trim_fraction=0.5)


def test_robust_settings_are_validated_and_choose_the_strategy(tmp_path) -> None:
    from pydantic import ValidationError

    from fedmoe.coordinator.settings import CoordinatorSettings
    from fedmoe.coordinator.strategies import build_strategy
    from fedmoe.coordinator.strategy_store import describe

    with pytest.raises(ValidationError, match="without strategy 'fedbuff'"):
        CoordinatorSettings(state_dir=tmp_path, robust_aggregation="median")
    with pytest.raises(ValidationError, match="trim_fraction has no effect"):
        CoordinatorSettings(state_dir=tmp_path, strategy="fedbuff", trim_fraction=0.1)
    with pytest.raises(ValidationError, match="outlier_norm_factor has no effect"):
        CoordinatorSettings(state_dir=tmp_path, strategy="fedbuff", outlier_norm_factor=5)
    settings = CoordinatorSettings(
        state_dir=tmp_path, strategy="fedbuff", buffer_size=4, outlier_test=True
    )
    strategy = build_strategy(settings)
    assert isinstance(strategy, RobustBuffStrategy) and strategy.robust.outlier_test
    assert describe(strategy)["robust"]["aggregation"] == "none"
    plain = build_strategy(CoordinatorSettings(state_dir=tmp_path, strategy="fedbuff"))
    assert not isinstance(plain, RobustBuffStrategy) and "robust" not in describe(plain)
