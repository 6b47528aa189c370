"""A poisoning worker cannot win: attackers run as real workers (real training, real HTTP)
against a FedBuff buffer of 3 combined by its plain mean, by the coordinate-wise median
with the outlier test, and against the default: ``async`` with the update screen (which
also meets the stealthy backdoor, scaled to the honest updates' norm).

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
import torch

from benchmarks import attackers
from benchmarks.attackers import ExpertScorer, backdoor_records, run_worker, sql_shards
from fedmoe import aggregate
from fedmoe.client import CoordinatorClient
from tests.conftest import start_live_coordinator

pytestmark = pytest.mark.heavy(22)  # run early (tests/conftest.py)


KINDS = ("clean", "scale", "flip", "backdoor")
SQL = "sql_expert"
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
ATTACKS = ("scale", "flip", "backdoor")


def _third(url: str, kind: str, data: dict[str, Path]) -> dict[str, Any]:
    if kind == "stealth":  # scaled to the smallest norm of the honest uploads before it
        with CoordinatorClient(url) as client:
            norms = [r.update_norm for r in client.ledger() if r.worker_id.startswith("honest")]
        return {"dataset": data["stealth"], "target_norm": min(norms), **HARDER}
    third = data["backdoor"] if kind == "backdoor" else data["honest2"]
    attack = kind if kind in ("scale", "flip") else None
    # the backdoor's owner trains harder (more steps, a higher lr) to plant it
    return {"dataset": third, "attack": attack, **(HARDER if kind == "backdoor" else {})}


def _federation(
    tmp: Path, settings: dict[str, Any], data: dict[str, Path], kinds: tuple[str, ...]
) -> dict[str, Any]:
    experts = [f"{kind}_expert" for kind in kinds]
    live = start_live_coordinator(tmp, experts=experts, **settings)
    try:
        with CoordinatorClient(live.url) as client:
            shapes = {key: tuple(value) for key, value in client.schema().tensors.items()}
            initial = client.expert_adapter("clean_expert", shapes)[1]  # version 0
        for kind in kinds:
            expert = f"{kind}_expert"
            for index in (0, 1):
                run_worker(live.url, f"{kind}-honest-{index}", expert, data[f"honest{index}"])
            run_worker(live.url, f"{kind}-third", expert, **_third(live.url, kind, data))
        with CoordinatorClient(live.url) as client:
            states = {kind: client.expert_adapter(f"{kind}_expert", shapes)[1] for kind in kinds}
            ledger = client.ledger()
    finally:
        live.stop()
    return {"states": states, "ledger": ledger, "initial": initial}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    data_dir = tmp_path_factory.mktemp("attack-data")
    shards = sql_shards(data_dir, 3, 8, seed=5)
    data = {f"honest{i}": path for i, path in enumerate(shards)}
    data["backdoor"] = attackers.write_jsonl(
        data_dir / "backdoor.jsonl", backdoor_records(8, seed=6)
    )
    scorer = ExpertScorer()
    results = {}
    for name, settings in STRATEGIES.items():
        run = _federation(tmp_path_factory.mktemp(name), settings, data, KINDS)
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


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The default (async, update screen), one SQL expert: 2 honest workers, then each
    attacker, the stealthy backdoor and an honest third, one after another. A rejected
    update leaves the expert as it was, so every attacker meets the same expert."""
    data_dir = tmp_path_factory.mktemp("default-data")
    data = {f"honest{i}": path for i, path in enumerate(sql_shards(data_dir, 3, 8, seed=5))}
    data["backdoor"] = attackers.write_jsonl(
        data_dir / "backdoor.jsonl", backdoor_records(8, seed=6)
    )
    data["stealth"] = attackers.write_jsonl(
        data_dir / "stealth.jsonl", attackers.stealth_records(8, seed=6)
    )
    live = start_live_coordinator(tmp_path_factory.mktemp("default"), experts=[SQL])
    states = {}
    try:
        with CoordinatorClient(live.url) as client:
            shapes = {key: tuple(value) for key, value in client.schema().tensors.items()}
            for index in (0, 1):
                run_worker(live.url, f"honest-{index}", SQL, data[f"honest{index}"])
            states["honest"] = client.expert_adapter(SQL, shapes)[1]
            for kind in (*ATTACKS, "stealth", "clean"):
                run_worker(live.url, kind, SQL, **_third(live.url, kind, data))
                states[kind] = client.expert_adapter(SQL, shapes)[1]
            ledger = client.ledger()
    finally:
        live.stop()
    return {"states": states, "ledger": ledger, "loss": ExpertScorer().losses}


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_default_update_screen_rejects_each_attacker(
    default_run: dict[str, Any], attack: str
) -> None:
    verdicts = _verdicts(default_run)
    verdict, reason = verdicts[attack]
    assert verdict == "rejected" and reason is not None, (verdict, reason)
    assert ("cosine" if attack == "flip" else "norm") in reason
    assert verdicts["honest-1"] == (None, None)  # the warm-up: 1 other worker
    # rejected: the expert is exactly what the two honest workers made
    attacked, honest = default_run["states"][attack], default_run["states"]["honest"]
    assert all(torch.equal(attacked[k], honest[k]) for k in honest)


def test_the_default_screen_passes_honest_workers_and_the_stealthy_backdoor_is_measured(
    default_run: dict[str, Any],
) -> None:
    rows = {r.worker_id: r for r in default_run["ledger"]}
    assert _verdicts(default_run)["clean"] == (None, None) and rows["clean"].weight > 0
    honest = min(rows[f"honest-{i}"].update_norm for i in (0, 1))
    stealthy = rows["stealth"]  # a real worker whose upload is scaled to an honest norm
    assert stealthy.update_norm == pytest.approx(honest, rel=1e-4) and stealthy.accepted
    # whatever its verdict (the benchmark reports it), the rejections cost the expert
    # nothing: the honest expert's loss is within 5% of it with a third honest worker
    loss = default_run["loss"]
    states = default_run["states"]
    assert loss(states["honest"])[0] <= 1.05 * loss(states["clean"])[0]
