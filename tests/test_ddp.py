"""Multi-process workers (torchrun, DDP over gloo on 2 CPU processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedmoe.config import TrainSettings
from fedmoe.demo_data import write_demo_datasets
from fedmoe.procs import ENV, free_port

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """A ``torchrun`` command line (through this interpreter) on a free port."""
    port = str(free_port())
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        port,
        *args,
    ]


def test_two_ranks_train_the_same_adapter_as_one_process(tmp_path) -> None:
    from ddp_train_rank import train  # tests/ is on sys.path under pytest

    # 9 examples, global batch 4: the epoch's last batch has 1 example, so rank 1's share
    # of it is empty; examples differ in length, so the ranks' token counts differ.
    dataset = write_demo_datasets(tmp_path, train_count=9, validation_count=1)["sql_expert"][0]
    settings = TrainSettings(batch_size=4, grad_accum=2, packing="on", cross_entropy="chunked")
    steps = 3
    command = torchrun(
        str(ROOT / "tests" / "ddp_train_rank.py"),
        str(dataset),
        str(tmp_path),
        str(steps),
        settings.model_dump_json(),
    )
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    alone, results, _ = train(dataset, settings, steps, distributed=False)
    ranks = load_file(str(tmp_path / "adapter.safetensors"))
    for (loss, tokens), (rank_loss, rank_tokens) in zip(
        results, json.loads((tmp_path / "steps.json").read_text()), strict=True
    ):
        assert rank_tokens == tokens  # the tokens of both ranks are counted
        assert rank_loss == pytest.approx(loss, rel=1e-5)
    assert alone.keys() == ranks.keys()
    for key, tensor in alone.items():
        torch.testing.assert_close(ranks[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    moved = max((alone[k] - v).abs().max() for k, v in _initial().items())
    assert moved > 1e-3  # the adapter did train


def _initial():
    from fedmoe.config import LoraSettings
    from fedmoe.modeling import initial_adapter, load_base_model

    return initial_adapter(load_base_model("tiny", device="cpu"), LoraSettings())


def _expected_tokens(dataset: Path, batch_size: int, steps: int) -> int:
    """Target tokens of the first ``steps`` global batches (the worker's own stream)."""
    from fedmoe.batching import BatchStream, count_trainable_tokens, tokenize_training_set
    from fedmoe.data import load_examples
    from fedmoe.tiny import build_tiny_tokenizer

    examples = tokenize_training_set(
        load_examples(dataset), build_tiny_tokenizer(), max_length=128, source=dataset
    )
    stream = BatchStream(examples, batch_size=batch_size, seed=0)
    return sum(count_trainable_tokens(next(stream)) for _ in range(steps))


def _worker_command(url: str, name: str, dataset: Path, ready: Path, *extra: str) -> list[str]:
    flags = f"--coordinator-url {url} --worker-id {name} --specialty python_expert "
    flags += f"--dataset {dataset} --validation-fraction 0 --batch-size 4 --max-length 128 "
    flags += f"--sync-interval 1 --eval-every 0 --threads 1 --ready-file {ready}"
    return torchrun("-m", "fedmoe", "worker", *flags.split(), *extra)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    from fedmoe.procs import start_coordinator, stop

    root = tmp_path_factory.mktemp("coordinator")
    process, url = start_coordinator(root / "state", root / "coordinator.log")
    yield url
    stop(process)


def _worker_status(url: str):
    from fedmoe.client import CoordinatorClient

    client = CoordinatorClient(url)
    try:
        return client.status().workers
    finally:
        client.close()


def test_torchrun_worker_end_to_end_rank_0_alone_talks_and_counts_both(tmp_path, coordinator):
    dataset = write_demo_datasets(tmp_path, train_count=24, validation_count=1)["python_expert"][0]
    summary_path, ready = tmp_path / "summary.json", tmp_path / "ready.json"
    command = _worker_command(
        coordinator,
        "ddp-w",
        dataset,
        ready,
        "--max-steps",
        "6",
        "--summary-json",
        str(summary_path),
    )
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    expected = _expected_tokens(dataset, batch_size=4, steps=6)
    assert summary["ranks"] == 2 and summary["steps"] == 6
    assert summary["tokens"] == expected  # both ranks' shares, not rank 0's alone
    workers = _worker_status(coordinator)
    assert [w for w in workers if w.startswith("ddp-w")] == ["ddp-w"]  # one for both ranks
    # rank 0 alone uploads: a second uploading rank would double the coordinator's count
    assert workers["ddp-w"].tokens == expected and workers["ddp-w"].updates >= 1


def test_killing_a_rank_stops_the_job_with_a_final_upload(tmp_path, coordinator):
    import os
    import re
    import signal
    import time

    from fedmoe.procs import spawn, stop, wait_for_json

    dataset = write_demo_datasets(tmp_path, train_count=24, validation_count=1)["python_expert"][0]
    ready, log = tmp_path / "ready.json", tmp_path / "worker.log"
    process = spawn(_worker_command(coordinator, "ddp-k", dataset, ready), log)
    try:
        info = wait_for_json(ready, process, timeout=240, log=log)
        assert len(info["ranks"]) == 2 and info["pid"] == info["ranks"][0]
        deadline = time.monotonic() + 120
        while (
            not _worker_status(coordinator).get("ddp-k")
            or not _worker_status(coordinator)["ddp-k"].updates
        ):
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        os.kill(info["ranks"][1], signal.SIGKILL)
        code = process.wait(timeout=120)
    finally:
        stop(process)
    text = " ".join(log.read_text().split())  # rich wraps the error message
    assert code != 0, text[-3000:]
    assert "another rank died or stopped answering" in text, text[-3000:]
    match = re.search(
        r"stopped after (\d+) steps, final upload from rank 0: nothing left unsent", text
    )
    assert match, text[-3000:]
    steps = int(match.group(1))
    workers = _worker_status(coordinator)
    assert [w for w in workers if w.startswith("ddp-k")] == ["ddp-k"]  # one for both ranks
    assert workers["ddp-k"].tokens == _expected_tokens(dataset, 4, steps)
