"""The update screen of the asynchronous default: the pure functions against hand-computed
values, the strategy's warm-up, verdicts and durable state, and its settings."""

from __future__ import annotations

import pytest
import torch

from fedmoe import robust_aggregate
from fedmoe.coordinator.replay import replay_description, strategy_from
from fedmoe.screen_strategy import ScreenedAsyncStrategy, ScreenOptions
from fedmoe.server_strategy import AsyncStrategy, Contribution, ServerOptimizer, StrategyState

KEY = "layer.lora_B.weight"


def _s(*values: float) -> dict[str, torch.Tensor]:
    return {KEY: torch.tensor(values, dtype=torch.float32)}


def _update(worker: str, delta: dict[str, torch.Tensor], index: int = 0) -> Contribution:
    return Contribution(f"{worker}-{index}", delta, 0.5, 1.0, 1.0, 1, float(index), worker)


def test_history_reason_by_hand() -> None:
    norms = [1.0, 2.0, 3.0]  # median 2: the bound is 3 x 2 = 6
    assert robust_aggregate.history_reason(5.9, 0.5, norms, norm_factor=3, min_cosine=0) is None
    reason = robust_aggregate.history_reason(6.5, 0.5, norms, norm_factor=3, min_cosine=0)
    assert reason is not None and "norm 6.5 > 3 x the others' median 2" in reason
    reason = robust_aggregate.history_reason(1.0, -0.25, norms, norm_factor=3, min_cosine=0)
    assert reason is not None and "cosine -0.250" in reason
    assert (
        robust_aggregate.history_reason(1.0, -0.25, norms, norm_factor=3, min_cosine=-0.5) is None
    )
    assert robust_aggregate.history_reason(1e9, -1.0, [], norm_factor=3, min_cosine=0) is None


def test_direction_average_by_hand() -> None:
    first = robust_aggregate.direction_average(None, _s(3.0, 4.0), 5.0, 0.75)
    torch.testing.assert_close(first[KEY], torch.tensor([0.15, 0.2]))  # 0.25 x (0.6, 0.8)
    second = robust_aggregate.direction_average(first, _s(0.0, 2.0), 2.0, 0.75)
    torch.testing.assert_close(second[KEY], torch.tensor([0.1125, 0.4]))  # 0.75 x + 0.25 x (0, 1)


def _screened(**options: object) -> ScreenedAsyncStrategy:
    return ScreenedAsyncStrategy(
        optimizer=ServerOptimizer(),
        screen=ScreenOptions(**options),  # type: ignore[arg-type]
    )


def _run(strategy: AsyncStrategy, updates: list[Contribution]):
    params, state, outcomes = _s(0.0, 0.0, 0.0), StrategyState(), []
    for update in updates:
        outcome = strategy.receive(params, update, state)
        assert outcome.params is not None  # async: every update makes a version
        params, state = outcome.params, outcome.state
        outcomes.append(outcome)
    return params, state, outcomes


def test_a_lone_worker_is_applied_exactly_as_by_the_async_rule() -> None:
    # however odd its updates, a worker with no peers is never judged (the warm-up)
    updates = [_update("w", _s(*v), i) for i, v in enumerate([(1, 1, 0), (-90, 3, 2), (0, 0, 7)])]
    plain, _, _ = _run(AsyncStrategy(optimizer=ServerOptimizer()), updates)
    screened, state, outcomes = _run(_screened(), updates)
    assert torch.equal(plain[KEY], screened[KEY])
    assert all(o.state.verdicts == () for o in outcomes)
    assert state.recent == (("w", 7.0, True),)  # one entry per worker: its latest
    assert state.direction is None  # no second full-size tensor for a lone worker's expert
    _, state, _ = _run(_screened(), [*updates, _update("v", _s(0.0, 2.0, 0.0), 3)])
    torch.testing.assert_close(state.direction[KEY], torch.tensor([0.0, 1.0 / 16, 0.0]))


def test_outliers_are_rejected_after_the_warm_up_and_honest_updates_pass() -> None:
    honest = [_update(w, _s(1.0, 1.0, 0.5), i) for i, w in enumerate("abc")]
    attacks = {
        "norm": _update("d", _s(100.0, 100.0, 50.0), 3),  # 150 > 3 x median 1.5
        "cosine": _update("d", _s(-1.0, -1.0, -0.5), 3),
    }
    norm = {"norm": 22500**0.5, "cosine": 2.25**0.5}
    before, state, _ = _run(_screened(), honest)
    for word, attack in attacks.items():
        outcome = _screened().receive(before, attack, state)
        assert outcome.weight == 0.0 and outcome.params is not None
        assert torch.equal(outcome.params[KEY], before[KEY])
        ((update_id, verdict, reason),) = outcome.state.verdicts
        assert (update_id, verdict) == ("d-3", "rejected") and word in reason
        # its norm is remembered (one vote per worker), its direction is not
        assert outcome.state.recent == (*state.recent, ("d", pytest.approx(norm[word]), False))
        assert torch.equal(outcome.state.direction[KEY], state.direction[KEY])
    fine = _screened().receive(before, _update("d", _s(1.2, 0.9, 0.5), 3), state)
    assert fine.weight == 0.5 and fine.state.verdicts == ()  # η = 1, s(τ) = 0.5
    torch.testing.assert_close(fine.params[KEY], before[KEY] + 0.5 * torch.tensor([1.2, 0.9, 0.5]))
    # the second honest worker is judged against one other only: not yet (min_workers 2)
    _, _, outcomes = _run(_screened(), [honest[0], _update("b", _s(-50.0, 0.0, 0.0), 1)])
    assert outcomes[1].weight == 0.5 and outcomes[1].state.verdicts == ()


def test_when_every_worker_changes_its_norm_the_screen_follows_within_a_round() -> None:
    small = [_update(w, _s(0.6, 0.8, 0.0), i) for i, w in enumerate("abc")]  # norm 1
    large = [_update(w, _s(3.0, 4.0, 0.0), 3 + i) for i, w in enumerate("abca")]  # norm 5
    _, state, outcomes = _run(_screened(), small + large)
    weights = [o.weight for o in outcomes[3:]]
    # a: others (1, 1), 5 > 3 x 1: rejected; b: only c's latest was accepted (a's was
    # rejected: no vote), so not judged; c: only b (5): not judged; a again: (5, 5), accepted
    assert weights == [0.0, 0.5, 0.5, 0.5]
    assert state.recent == (("b", 5.0, True), ("c", 5.0, True), ("a", 5.0, True))


def test_a_persistent_attacker_stays_rejected_and_honest_workers_stay_accepted() -> None:
    honest, scaled = _s(1.0, 1.0, 0.5), _s(100.0, 100.0, 50.0)
    order = [("a", honest), ("b", honest), ("c", honest), ("d", scaled), ("a", honest)]
    order += [("d", scaled), ("b", honest), ("d", scaled), ("c", honest)]
    updates = [_update(w, delta, i) for i, (w, delta) in enumerate(order)]
    _, state, outcomes = _run(_screened(), updates)
    weights = {(u.worker_id, o.weight) for u, o in zip(updates, outcomes)}
    assert weights == {("a", 0.5), ("b", 0.5), ("c", 0.5), ("d", 0.0)}
    latest = [entry[0::2] for entry in state.recent]  # (worker, accepted), oldest first
    assert latest == [("a", True), ("b", True), ("d", False), ("c", True)]


def test_history_is_bounded_and_the_state_round_trips() -> None:
    updates = [_update(w, _s(1.0, float(i), 0.5), i) for i, w in enumerate("abcdea")]
    _, state, _ = _run(_screened(history=4, min_workers=3), updates)
    assert [entry[0] for entry in state.recent] == list("cdea")  # the last 4 workers, once each
    again = StrategyState.from_parts(state.tensors(), state.scalars())
    assert again.recent == state.recent and not again.empty
    assert state.direction is not None and again.direction is not None
    assert torch.equal(again.direction[KEY], state.direction[KEY])
    strategy = _screened(norm_factor=4.0, min_cosine=-0.1)
    rebuilt = strategy_from(replay_description(strategy))
    assert isinstance(rebuilt, ScreenedAsyncStrategy) and rebuilt.screen == strategy.screen
    with pytest.raises(ValueError, match="min workers"):
        ScreenOptions(history=4, min_workers=4)


def test_screen_settings_are_validated_and_choose_the_strategy(tmp_path) -> None:
    from pydantic import ValidationError

    from fedmoe.coordinator.settings import CoordinatorSettings
    from fedmoe.coordinator.strategies import build_strategy

    default = build_strategy(CoordinatorSettings(state_dir=tmp_path))
    assert isinstance(default, ScreenedAsyncStrategy) and default.screen == ScreenOptions()
    off = build_strategy(CoordinatorSettings(state_dir=tmp_path, screen_updates=False))
    assert type(off) is AsyncStrategy
    with pytest.raises(ValidationError, match="without screen_updates"):
        CoordinatorSettings(state_dir=tmp_path, screen_updates=False, screen_norm_factor=5)
    with pytest.raises(ValidationError, match="without strategy 'async'"):
        CoordinatorSettings(state_dir=tmp_path, strategy="fedbuff", screen_min_cosine=-0.2)
    with pytest.raises(ValidationError, match="less than screen_history"):
        CoordinatorSettings(state_dir=tmp_path, screen_history=3, screen_min_workers=3)


def test_a_rejected_worker_is_recorded_and_not_counted_as_active(tmp_path) -> None:
    from fedmoe.adapters import encode_adapter
    from fedmoe.coordinator.bootstrap import open_coordinator, register_in_process
    from fedmoe.coordinator.settings import CoordinatorSettings
    from fedmoe.coordinator.versions import UpdateRequest

    sql = "sql_expert"
    settings = CoordinatorSettings(host="127.0.0.1", state_dir=tmp_path, experts=[sql])
    coordinator = open_coordinator(settings)
    try:
        shared = {k: torch.randn(s) * 1e-2 for k, s in coordinator.schema.items()}
        for index, (worker, factor) in enumerate([("a", 1.0), ("b", 1.1), ("c", 100.0)]):
            register_in_process(coordinator, worker, sql)
            body = encode_adapter({k: factor * v for k, v in shared.items()})
            base = coordinator.experts[sql].version
            request = UpdateRequest(sql, worker, f"u{index}", base, 10, 1.0, body)
            ack = coordinator.submit_update(request)
        assert ack.weight == 0.0 and ack.version == 3  # a new version, θ unchanged
        (row,) = [r for r in coordinator.ledger.updates(limit=10) if r.worker_id == "c"]
        assert row.verdict == "rejected" and row.reason is not None and "norm" in row.reason
        assert coordinator.ledger.recent_activity(sql, 0.0).workers == {"a", "b"}
        assert coordinator.strategies.status(sql).screen_updates
    finally:
        coordinator.close()
