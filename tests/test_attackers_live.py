"""A poisoning worker cannot win: attackers run as real workers (real training, real HTTP)
against a FedBuff buffer of 3 combined by its plain mean, and by the coordinate-wise median
with the outlier test.

Per coordinator, four experts each get two honest SQL workers and one more: honest
(the clean run), one that scales its delta by 100, one that flips its sign, or one trained
on backdoored data. Workers run one after another from the same expert version, so each
run is deterministic and the two coordinators differ only in how the buffer is combined.
(The default ``async`` strategy applies every update in full: the ×100 attacker moves the
expert 100 times as far as an honest worker; ``benchmarks/trust_bench.py`` measures it.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.attackers import ExpertScorer, backdoor_records, run_worker, sql_shards, write_jsonl
from fedmoe import aggregate
from fedmoe.client import CoordinatorClient
from tests.conftest import start_live_coordinator

pytestmark = pytest.mark.heavy(30)  # run early (tests/conftest.py)


KINDS = ("clean", "scale", "flip", "backdoor")
HARDER = {"max_steps": 4, "learning_rate": 0.05, "batch_size": 2}
BUFFER = {"strategy": "fedbuff", "buffer_size": 3}
STRATEGIES: dict[str, dict[str, Any]] = {
    "plain": BUFFER,
    "robust": BUFFER
    | {
        "robust_aggregation": "median",
        "outlier_test": True,
    },
}


def _federation(tmp: Path, settings: dict[str, Any], data: dict[str, Path]) -> dict[str, Any]:
    experts = [f"{kind}_expert" for kind in KINDS]
    live = start_live_coordinator(tmp, experts=experts, **settings)
    try:
        with CoordinatorClient(live.url) as client:
            shapes = {key: tuple(value) for key, value in client.schema().tensors.items()}
            initial = client.expert_adapter("clean_expert", shapes)[1]  # version 0
        for kind in KINDS:
            expert = f"{kind}_expert"
            for index in (0, 1):
                run_worker(live.url, f"{kind}-honest-{index}", expert, data[f"honest{index}"])
            third = data["backdoor"] if kind == "backdoor" else data["honest2"]
            attack = kind if kind in ("scale", "flip") else None
            # the backdoor's owner trains harder (more steps, a higher lr) to plant it
            harder = HARDER if kind == "backdoor" else {}
            run_worker(live.url, f"{kind}-third", expert, third, attack=attack, **harder)
        with CoordinatorClient(live.url) as client:
            states = {kind: client.expert_adapter(f"{kind}_expert", shapes)[1] for kind in KINDS}
            ledger = client.ledger()
    finally:
        live.stop()
    return {"states": states, "ledger": ledger, "initial": initial}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    data_dir = tmp_path_factory.mktemp("attack-data")
    shards = sql_shards(data_dir, 3, 8, seed=5)
    data = {f"honest{i}": path for i, path in enumerate(shards)}
    data["backdoor"] = write_jsonl(data_dir / "backdoor.jsonl", backdoor_records(8, seed=6))
    scorer = ExpertScorer()
    results = {}
    for name, settings in STRATEGIES.items():
        run = _federation(tmp_path_factory.mktemp(name), settings, data)
        run["losses"] = {kind: scorer.losses(state) for kind, state in run["states"].items()}
        results[name] = run
    return results


def _verdicts(run: dict[str, Any]) -> dict[str, tuple[str | None, str | None]]:
    return {row.worker_id: (row.verdict, row.reason) for row in run["ledger"] if row.accepted}


def _distance(run: dict[str, Any], kind: str) -> float:
    """‖θ_attacked − θ_clean‖ / ‖θ_clean − θ_0‖: how far the attack moved the expert, relative
    to how far clean training moved it (θ_0: the shared initial adapter)."""
    attacked, clean, initial = run["states"][kind], run["states"]["clean"], run["initial"]
    apart = aggregate.global_norm({k: attacked[k] - clean[k] for k in clean})
    return apart / aggregate.global_norm({k: clean[k] - initial[k] for k in clean})


@pytest.mark.parametrize("attack", ["scale", "flip"])
def test_tampered_deltas_hurt_the_plain_mean_and_are_rejected_by_the_robust_buffer(
    outcomes: dict[str, dict[str, Any]], attack: str
) -> None:
    plain, robust = outcomes["plain"], outcomes["robust"]
    # the plain mean moved far from the clean run (x100: 33 times an update; flipped: back);
    # the robust buffer stays as close as the median of 2 honest updates is to that of 3
    assert _distance(plain, attack) > 0.6, _distance(plain, attack)
    assert _distance(robust, attack) < min(0.5, _distance(plain, attack)), _distance(robust, attack)
    assert robust["losses"][attack][0] <= 1.05 * robust["losses"]["clean"][0], robust["losses"]
    if attack == "flip":  # (on this toy model a x100 step does not raise the loss)
        assert plain["losses"][attack][0] > 1.05 * plain["losses"]["clean"][0], plain["losses"]
    verdict, reason = _verdicts(robust)[f"{attack}-third"]
    assert verdict == "rejected" and reason is not None
    assert ("norm" if attack == "scale" else "cosine") in reason
    assert _verdicts(robust)[f"{attack}-honest-0"] == (None, None)
    assert _verdicts(plain)[f"{attack}-third"] == (None, None)


def test_backdoor_takes_hold_under_the_plain_mean_not_under_the_robust_buffer(
    outcomes: dict[str, dict[str, Any]],
) -> None:
    plain, robust = outcomes["plain"]["losses"], outcomes["robust"]["losses"]
    # the trigger's target string got much likelier under the plain mean ...
    planted = plain["clean"][1] - plain["backdoor"][1]
    assert planted > 0.5, plain
    # ... and stays near the clean run under the robust buffer
    assert abs(robust["backdoor"][1] - robust["clean"][1]) < 0.5 * planted, (plain, robust)
    assert robust["backdoor"][0] <= 1.05 * robust["clean"][0]
    assert _verdicts(outcomes["robust"])["backdoor-third"][0] == "rejected"
