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
