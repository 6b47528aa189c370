"""A real run: coordinator under uvicorn, two workers training the tiny model over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedmoe.client import CoordinatorClient
from fedmoe.demo_data import write_demo_datasets
from fedmoe.export import fetch_adapter_dir, generate, load_with_adapter
from fedmoe.modeling import fingerprint_model, load_base_model
from fedmoe.procs import start_coordinator, start_worker, stop
from fedmoe.tiny import export_tiny

pytestmark = pytest.mark.heavy(28)  # run early (tests/conftest.py)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Coordinator + python and sql workers, 3 sync rounds or more each."""
    root = tmp_path_factory.mktemp("e2e")
    data = write_demo_datasets(root / "data", train_count=60, validation_count=10)
    coordinator, url = start_coordinator(root / "state", root / "coordinator.log")
    workers = []
    try:
        for index, domain in enumerate(("python_expert", "sql_expert"), start=1):
            train, validation = data[domain]
            workers.append(
                start_worker(
                    url,
                    f"W{index}",
                    domain,
                    train,
                    root / f"w{index}.log",
                    # a fixed amount of training (10 steps already halve the loss), a
                    # sync due at every few steps: the same run on a quiet or a busy machine
                    "--sync-interval",
                    "0.2",
                    "--max-steps",
                    "30",
                    "--eval-dataset",
                    str(validation),
                    "--batch-size",
                    "4",
                    "--summary-json",
                    str(root / f"w{index}.json"),
                )
            )
        codes = [w.wait(timeout=180) for w in workers]
        logs = {i: (root / f"w{i}.log").read_text()[-2000:] for i in (1, 2)}
        assert codes == [0, 0], logs
        yield {"url": url, "root": root, "data": data}
    finally:
        for process in [*workers, coordinator]:
            stop(process)


def test_workers_synced_several_rounds(run) -> None:
    with CoordinatorClient(run["url"]) as client:
        status = client.status()
    for index, domain in enumerate(("python_expert", "sql_expert"), start=1):
        summary = json.loads((run["root"] / f"w{index}.json").read_text())
        assert summary["uploads"] >= 3, summary
        assert summary["unsent_tokens"] == 0
        expert = status.experts[domain]
        assert expert.version == expert.updates_applied == summary["uploads"]
        worker = status.workers[f"W{index}"]
        assert worker.specialty == domain and worker.updates == summary["uploads"]
        assert worker.last_staleness == 0
        assert worker.last_train_loss is not None and worker.last_train_loss > 0
    assert status.experts["docs_expert"].version == 0
    assert status.gateway.version == sum(e.version for e in status.experts.values())


def test_gateway_downloads_as_peft_adapter_and_generates(run, tmp_path) -> None:
    with CoordinatorClient(run["url"]) as client:
        info = client.gateway_info()
        written = fetch_adapter_dir(client, tmp_path / "gateway")
    assert written["version"] == info.version and info.merge_method == "cat"
    config = json.loads((tmp_path / "gateway" / "adapter_config.json").read_text())
    assert config["r"] == 3 * 8 and config["lora_alpha"] == 3 * 16
    model, tokenizer = load_with_adapter("tiny", tmp_path / "gateway", device="cpu")
    assert isinstance(model, PeftModel)
    text = generate(model, tokenizer, "Write a Python function", max_new_tokens=12)
    assert isinstance(text, str) and len(text) > 0


def test_trained_experts_beat_the_base_on_their_domain(run, tmp_path) -> None:
    from fedmoe.batching import tokenize_examples
    from fedmoe.data import load_examples
    from fedmoe.evaluation import validation_loss

    base = load_base_model("tiny", device="cpu")
    validation = run["data"]["python_expert"][1]
    examples = tokenize_examples(load_examples(validation), base.tokenizer, max_length=256)
    base_loss = validation_loss(base.model, examples, pad_token_id=base.tokenizer.pad_token_id)
    with CoordinatorClient(run["url"]) as client:
        fetch_adapter_dir(client, tmp_path / "py", expert="python_expert")
    model, _ = load_with_adapter("tiny", tmp_path / "py", device="cpu")
    expert_loss = validation_loss(model, examples, pad_token_id=base.tokenizer.pad_token_id)
    assert expert_loss < base_loss - 0.1


def test_tiny_preset_exports_as_ordinary_hf_directory(tmp_path) -> None:
    export_tiny(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    reference = load_base_model("tiny", device="cpu")
    assert fingerprint_model(model) == reference.fingerprint
    text = "SELECT name FROM users;\n"
    assert tokenizer(text)["input_ids"] == reference.tokenizer(text)["input_ids"]
    with torch.no_grad():
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        torch.testing.assert_close(model(ids).logits, reference.model(ids).logits)


def test_worker_refuses_bad_dataset_line_before_training(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": 3, "completion": "x"}\n')
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmoe",
            "worker",
            "--coordinator-url",
            "http://127.0.0.1:9",
            "--worker-id",
            "W",
            "--specialty",
            "python_expert",
            "--dataset",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"{bad}:2" in result.stderr.replace("\n", "") and "prompt" in result.stderr
    assert time.monotonic() - started < 60
