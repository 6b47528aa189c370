"""Bad places and values for what the CLI writes or needs: one clear line naming it, exit 2
(1 for an unreachable coordinator), nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedmoe.cli import app
from fedmoe.modeling import resolve_device

runner = CliRunner()


def _refused(args: list[str], *expected: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    # rich wraps to the console's width, inside paths too: compare without whitespace
    squeezed = "".join(result.output.split())
    for text in expected:
        assert "".join(text.split()) in squeezed, result.output


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--seconds", "-1", "--seconds must be > 0, got -1.0"),
        ("--sync-interval", "0", "--sync-interval must be > 0, got 0.0"),
        ("--train-count", "0", "--train-count must be > 0, got 0"),
    ],
)
def test_demo_refuses_a_bad_value_before_writing(tmp_path: Path, option, value, message) -> None:
    output = tmp_path / "demo"
    _refused(["demo", "--output", str(output), option, value], message)
    assert not output.exists()


def test_demo_refuses_a_file_as_its_output(tmp_path: Path) -> None:
    output = tmp_path / "a-file"
    output.write_text("mine")
    _refused(["demo", "--output", str(output)], "exists and is not a directory")
    assert output.read_text() == "mine"


@pytest.mark.parametrize("command", ["make-demo-data", "export-tiny"])
def test_writing_into_a_file_is_named(tmp_path: Path, command: str) -> None:
    target = tmp_path / "a-file"
    target.write_text("mine")
    _refused([command, str(target)], "cannot write the", str(target))
    assert target.read_text() == "mine"


def test_make_demo_data_refuses_a_negative_count(tmp_path: Path) -> None:
    _refused(["make-demo-data", str(tmp_path / "d"), "--train-count", "-5"], "--train-count")
    assert not (tmp_path / "d").exists()


def test_gateway_and_export_name_an_output_they_cannot_write(live_coordinator, tmp_path) -> None:
    target = tmp_path / "a-file"
    target.write_text("mine")
    url = ["--coordinator-url", live_coordinator.url]
    _refused(["gateway", *url, "--output", str(target)], f"cannot write to {target}")
    _refused(["export-vllm", str(target), *url], f"cannot write to {target}")
    assert target.read_text() == "mine"


def test_worker_names_a_summary_path_it_could_not_write_before_training(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "SELECT 1;"}\n')
    summary = tmp_path / "missing" / "summary.json"
    worker = ["worker", "--worker-id", "w", "--specialty", "sql_expert", "--dataset", str(data)]
    _refused([*worker, "--summary-json", str(summary)], "--summary-json", "is no directory")


def test_gateway_prompt_names_a_base_model_it_cannot_load(live_coordinator, tmp_path) -> None:
    url = ["--coordinator-url", live_coordinator.url]
    missing = str(tmp_path / "no-model")
    _refused(["gateway", *url, "--prompt", "hi", "--base-model", missing], "no such directory")
    _refused(["gateway", *url, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens")


def test_tls_files_that_do_not_exist_are_named_before_the_state_dir_is_made(tmp_path) -> None:
    state, missing = tmp_path / "state", tmp_path / "cert.pem"
    coordinator = ["coordinator", "--state-dir", str(state), "--port", "0"]
    _refused([*coordinator, "--ssl-certfile", str(missing)], f"--ssl-certfile: {missing} does")
    assert not state.exists()
    serve = ["serve", "--adapters-dir", str(tmp_path), "--port", "0"]
    _refused([*serve, "--ssl-keyfile", str(missing)], f"--ssl-keyfile: {missing} does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device 'cuda:0': CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="device 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_serve_names_a_coordinator_it_cannot_reach() -> None:
    result = runner.invoke(app, ["serve", "--coordinator-url", "http://127.0.0.1:9", "--port", "0"])
    assert result.exit_code == 1, result.output
    assert "coordinatorhttp://127.0.0.1:9:" in "".join(result.output.split())
