"""The coordinator and worker options are generated from the settings models, once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import Field
from typer.testing import CliRunner

from fedmoe import docs
from fedmoe.cli import app
from fedmoe.cli_common import fail
from fedmoe.config import LoraSettings
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.fields import ID_PATTERN, flat_fields
from fedmoe.settings_cli import settings_command
from fedmoe.worker.options import WorkerOptions

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

# Every flag the README, the scripts, the tests and the design doc use today.
COORDINATOR_FLAGS = {
    "--host", "--port", "--base-model", "--experts", "--state-dir", "--lora-rank",
    "--lora-alpha", "--lora-dropout", "--lora-target-modules", "--lora-seed", "--server-lr",
    "--staleness", "--staleness-a", "--staleness-b", "--max-staleness", "--merge-method",
    "--gateway-weights", "--gateway-file-interval", "--max-update-norm", "--norm-policy",
    "--max-body-bytes", "--auth-token", "--tokens-file", "--insecure", "--ssl-certfile",
    "--ssl-keyfile",
}  # fmt: skip
WORKER_FLAGS = {
    "--coordinator-url", "--worker-id", "--specialty", "--dataset", "--eval-dataset",
    "--validation-fraction", "--sync-interval", "--base-model", "--device", "--lr",
    "--batch-size", "--max-length", "--grad-accum", "--seed", "--max-steps", "--max-seconds",
    "--upload-dtype", "--slowdown", "--auth-token", "--ca-cert",
}  # fmt: skip


def _capture(model: type[Any]) -> tuple[typer.Typer, list[Any]]:
    """A one-command app over the real generator that keeps the settings it was given."""
    seen: list[Any] = []
    probe = typer.Typer()

    @probe.command()
    @settings_command(model, fail)
    def run(settings: Any) -> None:
        seen.append(settings)

    @probe.command()
    def other() -> None:  # a second command keeps `run` a named subcommand
        """Unused."""

    return probe, seen


def test_flags_keep_their_names_and_every_field_has_a_flag_with_help() -> None:
    for model, expected in (
        (CoordinatorSettings, COORDINATOR_FLAGS),
        (WorkerOptions, WORKER_FLAGS),
    ):
        fields = flat_fields(model)
        assert expected <= {f.flag for f in fields}
        assert all(f.info.description for f in fields), "every option needs help text"
        assert all(f.env == "FEDMOE_" + f.flag[2:].replace("-", "_").upper() for f in fields)


def test_help_lists_generated_options_with_defaults_and_choices() -> None:
    result = runner.invoke(app, ["coordinator", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    for text in ("--lora-target-modules", "FEDMOE_LORA_RANK", "cat|linear|svd", "5000"):
        assert text in result.output


def test_values_reach_the_model_from_flags_and_variables_and_flags_win() -> None:
    probe, seen = _capture(CoordinatorSettings)
    env: dict[str, str | None] = {"FEDMOE_LORA_RANK": "4", "FEDMOE_PORT": "6001"}
    env["FEDMOE_EXPERTS"] = "a,b"
    env["FEDMOE_CACHE_DIR"] = None  # unset: the test session's (tests/conftest.py)
    args = ["run", "--port", "6002", "--lora-target-modules", "q_proj,v_proj"]
    args += ["--gateway-weights", "a=2,b=0.5", "--staleness", "hinge", "--staleness-b", "3"]
    result = runner.invoke(probe, args, env=env)
    assert result.exit_code == 0, result.output
    settings = seen[0]
    assert settings.port == 6002 and settings.experts == ["a", "b"]
    assert settings.lora.rank == 4 and settings.lora.target_modules == ("q_proj", "v_proj")
    assert settings.gateway_weights == {"a": 2.0, "b": 0.5}
    assert settings.staleness_decay().b == 3
    given = {"port", "experts", "lora", "gateway_weights", "staleness", "staleness_b"}
    assert settings.model_fields_set - {"host"} == given  # host is filled in by a validator


def test_options_not_given_leave_the_model_defaults() -> None:
    probe, seen = _capture(CoordinatorSettings)
    assert runner.invoke(probe, ["run"], env={}).exit_code == 0
    assert seen[0] == CoordinatorSettings()


def test_worker_options_nest_training_settings_under_their_old_flags() -> None:
    probe, seen = _capture(WorkerOptions)
    args = ["run", "--worker-id", "w-1", "--specialty", "s", "--dataset", "d.jsonl"]
    args += ["--lr", "0.5", "--batch-size", "2", "--upload-dtype", "bfloat16"]
    result = runner.invoke(probe, args, env={"FEDMOE_SEED": "7"})
    assert result.exit_code == 0, result.output
    options = seen[0]
    assert (options.train.learning_rate, options.train.batch_size, options.train.seed) == (
        0.5,
        2,
        7,
    )
    assert options.upload_dtype == "bfloat16" and options.dataset == Path("d.jsonl")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--staleness-b", "3"], "--staleness-b has no effect on the 'inverse' staleness decay"),
        (["--staleness", "constant", "--staleness-a", "1"], "--staleness-a has no effect"),
        (["--norm-policy", "reject"], "--norm-policy has no effect without --max-update-norm"),
        (["--lora-rank", "0"], "--lora-rank: Input should be greater than or equal to 1"),
        (["--gateway-weights", "python_expert"], "expects name=number pairs"),
    ],
)
def test_an_ignored_or_bad_coordinator_option_is_an_error_naming_it(args, message) -> None:
    probe, seen = _capture(CoordinatorSettings)
    result = runner.invoke(probe, ["run", *args], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and not seen
    assert message in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eval-dataset", "e", "--validation-fraction", "0.2"], "--validation-fraction has no"),
        (["--worker-id", "bad/id"], "--worker-id: String should match pattern"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_an_ignored_or_bad_worker_option_is_an_error_naming_it(args, message) -> None:
    probe, seen = _capture(WorkerOptions)
    base = ["run", "--worker-id", "w", "--specialty", "s", "--dataset", "d"]
    result = runner.invoke(probe, [*base, *args], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and not seen
    assert message in result.output


def test_a_new_settings_field_is_a_new_flag_and_variable_with_nothing_else() -> None:
    class Extended(CoordinatorSettings):
        max_workers: int = Field(100, ge=1, description="Most registered workers.")

    probe, seen = _capture(Extended)
    assert runner.invoke(probe, ["run", "--max-workers", "3"], env={}).exit_code == 0
    assert runner.invoke(probe, ["run"], env={"FEDMOE_MAX_WORKERS": "5"}).exit_code == 0
    assert [s.max_workers for s in seen] == [3, 5]


def test_nested_lora_variables_and_flat_keyword_arguments_reach_lora(monkeypatch) -> None:
    monkeypatch.setenv("FEDMOE_LORA_ALPHA", "4")
    monkeypatch.setenv("FEDMOE_LORA_TARGET_MODULES", '["v_proj"]')  # JSON, as before
    settings = CoordinatorSettings(lora_rank=2)
    assert (settings.lora.rank, settings.lora.alpha) == (2, 4.0)
    assert settings.lora.target_modules == ("v_proj",)
    explicit = CoordinatorSettings(lora=LoraSettings(alpha=2.0, seed=5), lora_rank=3)
    assert (explicit.lora.rank, explicit.lora.alpha, explicit.lora.seed) == (3, 2.0, 5)


def test_an_option_written_by_hand_as_well_is_refused_at_import() -> None:
    def command(settings: Any, port: int = 1) -> None:
        """Unused."""

    with pytest.raises(TypeError, match=r"\['port'\] are generated from CoordinatorSettings"):
        settings_command(CoordinatorSettings, fail)(command)


def test_readme_option_tables_are_up_to_date() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert docs.render(text) == text, "run: python -m fedmoe.docs"


def test_the_start_script_checks_the_same_worker_id_pattern_as_the_api() -> None:
    script = (ROOT / "scripts" / "start_worker.sh").read_text()
    shell = re.search(r'\[\[ "\$worker_id" =~ (\S+) \]\]', script)
    assert shell is not None and shell.group(1) == ID_PATTERN
