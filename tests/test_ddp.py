"""Multi-process workers (torchrun, DDP over gloo on 2 CPU processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.demo_data import write_demo_datasets
from fedmoe.procs import ENV, free_port

pytestmark = pytest.mark.heavy(20)  # run early (tests/conftest.py)


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


def _expected_tokens(dataset: Path, batch_size: int, micro_batches: int) -> int:
    """Target tokens of the first global micro-batches (the worker's own stream)."""
    from fedmoe.batching import BatchStream, count_trainable_tokens, tokenize_training_set
    from fedmoe.data import load_examples
    from fedmoe.tiny import build_tiny_tokenizer

    examples = tokenize_training_set(
        load_examples(dataset), build_tiny_tokenizer(), max_length=128, source=dataset
    )
    stream = BatchStream(examples, batch_size=batch_size, seed=0)
    return sum(count_trainable_tokens(next(stream)) for _ in range(micro_batches))


def _worker_command(url: str, name: str, dataset: Path, ready: Path, *extra: str) -> list[str]:
    specialty = dataset.parent.name  # the demo data's directory is named after its expert
    flags = f"--coordinator-url {url} --worker-id {name} --specialty {specialty} "
    flags += f"--dataset {dataset} --validation-fraction 0 --batch-size 4 --max-length 128 "
    flags += f"--sync-interval 1 --eval-every 0 --threads 1 --ready-file {ready}"
    return torchrun("-m", "fedmoe", "worker", *flags.split(), *extra)


@pytest.fixture(scope="module")
def coordinator(module_coordinator_factory) -> str:
    """A coordinator in this process (real HTTP on loopback): the workers are what is tested."""
    return module_coordinator_factory().url


def _worker_status(url: str):
    from fedmoe.client import CoordinatorClient

    client = CoordinatorClient(url)
    try:
        return client.status().workers
    finally:
        client.close()


def _alone(dataset: Path, settings: TrainSettings, steps: int):
    """The adapter one process trains from the shared initial adapter in ``steps`` steps."""
    from fedmoe.modeling import adapter_state
    from tests.train_helpers import tiny_lora_trainer

    model, trainer = tiny_lora_trainer(dataset, settings, max_length=128)
    for _ in range(steps):
        trainer.step()
    return adapter_state(model)


def test_two_ranks_train_like_one_process_rank_0_alone_talks_and_counts_both(tmp_path, coordinator):
    # 9 examples, global batch 4: each epoch's last batch has 1 example, so rank 1's share
    # of it is empty; the examples differ in length, so the ranks' token counts differ.
    dataset = write_demo_datasets(tmp_path, train_count=9, validation_count=1)["python_expert"][0]
    summary_path, ready = tmp_path / "summary.json", tmp_path / "ready.json"
    flags = "--max-steps 3 --grad-accum 2 --upload-dtype float32 --sync-interval 1000"
    command = _worker_command(coordinator, "ddp-w", dataset, ready, *flags.split())
    command += ["--summary-json", str(summary_path)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    expected = _expected_tokens(dataset, batch_size=4, micro_batches=3 * 2)
    assert summary["ranks"] == 2 and summary["steps"] == 3
    assert summary["tokens"] == expected  # both ranks' shares, not rank 0's alone
    workers = _worker_status(coordinator)
    # rank 0 alone uploads: a second uploading rank would double the coordinator's count
    assert workers["ddp-w"].tokens == expected and workers["ddp-w"].updates == 1
    # The expert is the initial adapter + the one float32 delta: what 2 ranks trained.
    from fedmoe.client import CoordinatorClient
    from fedmoe.modeling import initial_adapter, load_base_model

    initial = initial_adapter(load_base_model("tiny", device="cpu"), LoraSettings())
    client = CoordinatorClient(coordinator)
    try:
        shapes = {k: tuple(v.shape) for k, v in initial.items()}
        _, expert = client.expert_adapter("python_expert", shapes)
    finally:
        client.close()
    settings = TrainSettings(batch_size=4, grad_accum=2, max_length=128)
    alone = _alone(dataset, settings, steps=3)
    assert max((alone[k] - initial[k]).abs().max() for k in alone) > 1e-3  # it trained
    for key, tensor in alone.items():
        torch.testing.assert_close(expert[key], tensor, rtol=1e-4, atol=1e-6, msg=key)


def test_killing_a_rank_stops_the_job_with_a_final_upload(tmp_path, coordinator):
    import os
    import re
    import signal
    import time

    from fedmoe.procs import spawn, stop, wait_for_json

    dataset = write_demo_datasets(tmp_path, train_count=24, validation_count=1)["sql_expert"][0]
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


def test_a_finished_rank_leaves_with_its_logs_and_output_but_without_the_teardown(
    tmp_path: Path,
) -> None:
    # the teardown (atexit handlers, finalization) is what can abort a gloo rank after a
    # clean run; what the rank wrote must still be out
    log = tmp_path / "rank.log"
    script = (
        "import atexit, logging, sys\n"
        "from fedmoe.worker.distributed import leave_process\n"
        f"logging.basicConfig(filename={str(log)!r}, level=logging.INFO)\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "logging.getLogger('rank').info('uploaded')\n"
        "sys.stdout.write('summary printed')\n"  # no newline: still in the buffer
        "leave_process(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "summary printed"  # flushed; the atexit handler never ran
    assert "uploaded" in log.read_text()
