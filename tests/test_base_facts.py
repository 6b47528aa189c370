"""Kept base facts: the state dir's and the shared cache's copies equal a fresh load bit for
bit, a changed setting or a corrupt entry derives them again, a foreign state dir is still
refused, and a coordinator whose facts are kept starts without transformers or peft."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from fedmoe import procs
from fedmoe.coordinator.base_facts import (
    FACTS_FILE,
    STATE_DIR_FACTS,
    TENSORS_FILE,
    BaseFacts,
    cache_entry,
    facts_identity,
    recall_base_facts,
)
from fedmoe.coordinator.bootstrap import base_model_initial, open_coordinator
from fedmoe.coordinator.errors import StateDirError
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.tiny import export_tiny
from tests.api_helpers import hash_files

pytestmark = pytest.mark.heavy(4)  # run early (tests/conftest.py)


def _settings(tmp_path: Path, state: str = "state", **options: Any) -> CoordinatorSettings:
    return CoordinatorSettings(state_dir=tmp_path / state, cache_dir=tmp_path / "cache", **options)


class Derive:
    """``base_model_initial`` (a real load of the base model), counted."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, settings: CoordinatorSettings) -> BaseFacts:
        self.calls += 1
        return base_model_initial(settings)


def must_not_load(settings: CoordinatorSettings) -> BaseFacts:
    raise AssertionError(f"base model {settings.base_model} was loaded")


def assert_identical(kept: BaseFacts, fresh: BaseFacts) -> None:
    assert list(kept.initial) == list(fresh.initial)
    for key, tensor in fresh.initial.items():
        assert kept.initial[key].dtype == tensor.dtype == torch.float32
        assert torch.equal(kept.initial[key], tensor), key
    assert (kept.fingerprint, kept.hidden_size) == (fresh.fingerprint, fresh.hidden_size)
    assert kept.peft_config == fresh.peft_config is not None


def test_a_cache_hit_is_bit_identical_to_a_fresh_load(tmp_path: Path) -> None:
    fresh = base_model_initial(_settings(tmp_path))
    derive = Derive()
    first = recall_base_facts(_settings(tmp_path, "a"), derive)  # a miss: loaded, then cached
    hit = recall_base_facts(_settings(tmp_path, "b"), must_not_load)  # another state dir
    assert derive.calls == 1
    assert_identical(first.facts, fresh)
    assert_identical(hit.facts, fresh)
    entry = cache_entry(tmp_path / "cache", facts_identity(_settings(tmp_path)))
    assert entry is not None and sorted(p.name for p in entry.iterdir()) == [
        FACTS_FILE,
        TENSORS_FILE,
    ]
    assert json.loads((entry / FACTS_FILE).read_text())["fingerprint"] == fresh.fingerprint


def test_a_changed_lora_setting_misses_the_cache(tmp_path: Path) -> None:
    derive = Derive()
    recall_base_facts(_settings(tmp_path), derive)
    changes: list[dict[str, Any]] = [
        {"lora_rank": 4},
        {"lora_seed": 1},
        {"lora_alpha": 8.0},
        {"lora_target_modules": ["q_proj", "v_proj"]},
    ]
    for number, change in enumerate(changes, start=2):
        recalled = recall_base_facts(_settings(tmp_path, **change), derive)
        assert derive.calls == number, change
        assert_identical(recalled.facts, base_model_initial(_settings(tmp_path, **change)))
    ranks = {t.shape[0] for k, t in recalled.facts.initial.items() if "lora_A" in k}
    assert ranks == {8} and all("q_proj" in k or "v_proj" in k for k in recalled.facts.initial)
    assert recall_base_facts(_settings(tmp_path, lora_rank=4), must_not_load).facts


@pytest.mark.parametrize("damage", ["truncated tensors", "other tensors", "bad json"])
def test_a_corrupt_cache_entry_is_logged_loaded_again_and_rewritten(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path)
    fresh = recall_base_facts(settings, Derive()).facts
    entry = cache_entry(settings.cache_dir, facts_identity(settings))
    assert entry is not None
    tensors = entry / TENSORS_FILE
    if damage == "truncated tensors":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "other tensors":  # a valid file, but not the one facts.json vouches for
        state = load_file(tensors)
        save_file({key: value + 1 for key, value in state.items()}, tensors)
    else:
        (entry / FACTS_FILE).write_text('{"identity": ')
    derive = Derive()
    with caplog.at_level(logging.WARNING, logger="fedmoe.coordinator.base_facts"):
        recovered = recall_base_facts(_settings(tmp_path, "again"), derive)
    assert derive.calls == 1
    assert f"cannot read base facts in {entry} (cache)" in caplog.text
    assert_identical(recovered.facts, fresh)
    assert_identical(recall_base_facts(_settings(tmp_path, "third"), must_not_load).facts, fresh)


def test_a_restart_takes_the_facts_from_its_state_dir(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    fresh = base_model_initial(settings)
    open_coordinator(settings).close()
    kept = settings.state_dir / STATE_DIR_FACTS
    assert sorted(p.name for p in kept.iterdir()) == [FACTS_FILE, TENSORS_FILE]
    other_cache = settings.model_copy(update={"cache_dir": tmp_path / "empty-cache"})
    recalled = recall_base_facts(other_cache, must_not_load)
    assert recalled.from_state_dir
    assert_identical(recalled.facts, fresh)


def _perturbed_tiny(directory: Path) -> Path:
    """The tiny preset as a model directory, one weight changed: another base model."""
    export_tiny(directory)
    weights = directory / "model.safetensors"
    state = load_file(weights)
    key = next(k for k in sorted(state) if k.endswith("up_proj.weight"))
    state[key] = state[key] + 0.5
    save_file(state, weights, metadata={"format": "pt"})
    return directory


def test_a_state_dir_restarted_with_another_base_model_is_refused_and_left_as_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    open_coordinator(_settings(tmp_path)).close()
    state_dir = tmp_path / "state"
    before = hash_files(state_dir / STATE_DIR_FACTS)
    other = str(_perturbed_tiny(tmp_path / "other-model"))
    with caplog.at_level(logging.WARNING, logger="fedmoe.coordinator.base_facts"):
        with pytest.raises(StateDirError, match="base_model_fingerprint"):
            open_coordinator(_settings(tmp_path, base_model=other))
        with pytest.raises(StateDirError, match="lora"):
            open_coordinator(_settings(tmp_path, lora_rank=4))
    assert "were derived for another ['model']" in caplog.text
    assert "were derived for another ['lora']" in caplog.text
    assert hash_files(state_dir / STATE_DIR_FACTS) == before
    # the same weights under another name are the same model: accepted, facts rewritten
    same = str(export_tiny(tmp_path / "same-model"))
    open_coordinator(_settings(tmp_path, base_model=same)).close()
    stored = json.loads((state_dir / STATE_DIR_FACTS / FACTS_FILE).read_text())
    assert stored["identity"]["model"]["kind"] == "directory"
    recalled = recall_base_facts(_settings(tmp_path, base_model=same), must_not_load)
    assert recalled.from_state_dir


def test_a_coordinator_with_kept_facts_starts_without_transformers(tmp_path: Path) -> None:
    recall_base_facts(_settings(tmp_path, "warm"), Derive())  # fills tmp_path / "cache"
    log = tmp_path / "coordinator.log"
    process, url = procs.start_coordinator(
        tmp_path / "state",
        log,
        "--cache-dir",
        str(tmp_path / "cache"),
        env={"PYTHONPROFILEIMPORTTIME": "1"},  # python -X importtime: every import, to stderr
    )
    try:
        assert httpx.get(f"{url}/healthz").status_code == 200
        # the schema's PEFT config comes with the kept facts: no peft import for it either
        schema = httpx.get(f"{url}/v1/schema", timeout=30).json()
    finally:
        procs.stop(process)
    assert schema["peft_config"] == _settings(tmp_path).lora.peft_dict()
    assert (
        LoraConfig(**schema["peft_config"]).to_dict()
        == LoraConfig(**_settings(tmp_path).lora.to_peft().to_dict()).to_dict()
    )
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in log.read_text().splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert {"fedmoe.coordinator.base_facts", "torch", "uvicorn"} <= imported
    heavy = sorted(m for m in imported if m.split(".")[0] in ("transformers", "peft"))
    assert heavy == []
    assert (tmp_path / "state" / STATE_DIR_FACTS / FACTS_FILE).exists()
