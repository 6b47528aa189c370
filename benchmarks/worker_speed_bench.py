"""Worker speed: FedMoE's trainer and real worker vs a plain transformers + peft loop.

Run: ``.venv/bin/python -m benchmarks.worker_speed_bench [--quick] [--base-model tiny]
[--qwen05b-shape]``.

* Trainer loop: ``LocalTrainer.step`` against a minimal hand-written loop (``get_peft_model``,
  AdamW, the model's own loss, the same gradient clipping) on the same batches, the same
  device and thread count, in alternating chunks (ABBA) so that load changes hit both arms;
  FedMoE with each speed switch (packing, chunked cross-entropy) off and on.
* DDP scaling: the same training (global batch unchanged) on 1 process and on 2 torchrun
  ranks (gloo), tokens/s and scaling efficiency (``benchmarks._ddp_speed``).
* Real worker: ``WorkerJob`` in this process against a real ``fedmoe coordinator``
  subprocess on loopback, syncing every 10 s for at least 30 s of training; its tokens/s
  against plain-loop runs just before and after it, and its time blocked on syncs.
* ``--qwen05b-shape``: only the trainer-loop comparison, on a random-weight model shaped like
  Qwen2.5-0.5B with LoRA r=16 on all projections (≈ 8.8 M parameters); meant for a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel, Qwen2ForCausalLM

from benchmarks._speed_common import Step, qwen_config, timed
from benchmarks.common import DEMO_SYNC_INTERVAL, parser, setup_torch
from benchmarks.report import publish
from fedmoe.batching import (
    BatchStream,
    TokenizedExample,
    collate,
    count_trainable_tokens,
    tokenize_examples,
)
from fedmoe.config import ALL_PROJECTIONS, LoraSettings, TrainSettings
from fedmoe.data import load_examples
from fedmoe.demo_data import write_demo_datasets
from fedmoe.modeling import attach_lora, load_base_model, resolve_device
from fedmoe.procs import start_coordinator, stop
from fedmoe.tiny import build_tiny_tokenizer
from fedmoe.worker.job import WorkerJob
from fedmoe.worker.options import WorkerOptions
from fedmoe.worker.speed import resolve_plan
from fedmoe.worker.trainer import LocalTrainer, autocast_for

DOMAIN = "python_expert"


def qwen05b_shape() -> PreTrainedModel:
    """A random-weight model with Qwen2.5-0.5B's shape (float32)."""
    torch.manual_seed(0)
    return Qwen2ForCausalLM(qwen_config("0.5B"))


def base_model(name: str, shaped: bool, device: torch.device) -> PreTrainedModel:
    """A fresh base model on ``device``."""
    model = qwen05b_shape() if shaped else load_base_model(name, device="cpu").model
    return model.to(device)


@dataclass(frozen=True)
class LoopSetup:
    """What both training loops share: data, LoRA, training settings, device."""

    examples: list[TokenizedExample]
    lora: LoraSettings
    train: TrainSettings
    lr: float
    pad: int
    device: torch.device


def plain_step(model: PreTrainedModel, setup: LoopSetup) -> Step:
    """The plain loop: get_peft_model, AdamW, the model's loss, clipping as FedMoE's default."""
    lora, train, device = setup.lora, setup.train, setup.device
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(ALL_PROJECTIONS),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft = get_peft_model(model, config)
    peft.train()
    print(
        f"plain loop: {sum(p.numel() for p in peft.parameters() if p.requires_grad):,} LoRA params"
    )
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=setup.lr, weight_decay=0.0)
    batches = iter(BatchStream(setup.examples, batch_size=train.batch_size, seed=train.seed))

    def step() -> int:
        batch = collate(next(batches), setup.pad)
        tokens = count_trainable_tokens(batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(device):  # the same precision policy as LocalTrainer
            loss = peft(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens

    return step


#: FedMoE arms: (name, packing, cross_entropy).
FEDMOE_ARMS = (
    ("FedMoE, padded, full logits", "off", "full"),
    ("FedMoE + packing", "on", "full"),
    ("FedMoE + chunked CE", "off", "chunked"),
    ("FedMoE + packing + chunked CE", "on", "chunked"),
)
PLAIN = "plain transformers + peft"


def fedmoe_step(model: PreTrainedModel, setup: LoopSetup, packing: str, loss: str) -> Step:
    """FedMoE's loop: attach_lora + LocalTrainer, with these speed switches."""
    train = setup.train.model_copy(update={"packing": packing, "cross_entropy": loss})
    trainer = LocalTrainer(
        attach_lora(model, setup.lora),
        setup.examples,
        train,
        pad_token_id=setup.pad,
        device=setup.device,
        learning_rate=setup.lr,
    )
    return lambda: trainer.step().tokens


def interleaved(
    arms: dict[str, Step], rounds: int, chunk: int, device: torch.device, warmup: int = 2
) -> dict[str, float]:
    """Tokens/s of each arm over ``rounds`` ABBA-ordered chunks (after ``warmup`` steps)."""
    for step in arms.values():
        timed(step, warmup, device)
    totals = {name: [0, 0.0] for name in arms}
    names = list(arms)
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            tokens, seconds = timed(arms[name], chunk, device)
            totals[name][0] += tokens
            totals[name][1] += seconds
    return {name: tokens / seconds for name, (tokens, seconds) in totals.items()}


def real_worker(
    base_name: str, paths: tuple[Path, Path], train: TrainSettings, seconds: float, device: str
) -> dict:
    """A WorkerJob (in process) against a ``fedmoe coordinator`` subprocess on loopback."""
    work = Path(tempfile.mkdtemp(prefix="fedmoe-speed-"))
    coordinator, url = start_coordinator(
        work / "state", work / "coordinator.log", "--base-model", base_name
    )
    try:
        options = WorkerOptions(
            coordinator_url=url,
            worker_id="speed-worker",
            specialty=DOMAIN,
            dataset=paths[0],
            eval_dataset=paths[1],
            sync_interval=DEMO_SYNC_INTERVAL,
            device=device,
            train=train,
            max_seconds=seconds,
        )
        job = WorkerJob(options)
        job.setup()
        began = time.monotonic()
        job.train()
        trained = time.monotonic() - began
        blocked, uploads = job.stats.blocked_seconds, job.stats.uploads
        summary = job.cleanup()
    finally:
        stop(coordinator)
    return {
        "train_seconds": trained,
        "tokens_per_second": job.stats.tokens / trained,
        "blocked_share": blocked / trained,
        "blocked_seconds": blocked,
        "uploads": uploads,
        "summary": summary,
    }


def default_arm(device: torch.device) -> str:
    """The FedMoE arm that ``auto`` picks on this device kind."""
    plan = resolve_plan(TrainSettings(), device)
    for name, packing, loss in FEDMOE_ARMS:
        if (packing == "on") == plan.packing and loss == plan.cross_entropy:
            return name
    raise RuntimeError(f"no arm measures the default {plan}")


def ddp_scaling(dataset: Path, train: TrainSettings, steps: int) -> dict:
    """Tokens/s of 1 process and of 2 torchrun ranks (gloo), the global batch unchanged."""
    work = Path(tempfile.mkdtemp(prefix="fedmoe-ddp-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for world in (1, 2):
        out = work / f"ddp{world}.json"
        module = [sys.executable, "-m", "benchmarks._ddp_speed"]
        if world > 1:
            module = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            module += ["--nproc-per-node", str(world), "-m", "benchmarks._ddp_speed"]
        command = [*module, str(dataset), str(steps), train.model_dump_json(), str(out)]
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=900)
        result = json.loads(out.read_text())
        runs[world] = result["tokens"] / result["seconds"]
    return {
        "steps": steps,
        "one_process": runs[1],
        "two_processes": runs[2],
        "speedup": runs[2] / runs[1],
        "efficiency": runs[2] / (2 * runs[1]),
        "cores": os.cpu_count(),
    }


def main() -> None:
    """Measure and write the ``worker-speed`` (or ``worker-speed-qwen05b``) section."""
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--qwen05b-shape", action="store_true", help="Qwen2.5-0.5B shape.")
    args = options.parse_args()
    setup_torch()
    started, load_before = time.monotonic(), list(os.getloadavg())
    device = resolve_device("auto")
    shaped = args.qwen05b_shape
    lora = LoraSettings(rank=16, alpha=32.0) if shaped else LoraSettings()
    train = TrainSettings()
    if shaped and device.type == "cpu":
        print("no GPU: the Qwen2.5-0.5B-shaped comparison runs 2 tiny chunks as a smoke test only")
        train = TrainSettings(batch_size=2, max_length=128)
    tokenizer = (
        build_tiny_tokenizer()
        if shaped
        else load_base_model(args.base_model, device="cpu").tokenizer
    )
    paths = write_demo_datasets(Path(tempfile.mkdtemp(prefix="fedmoe-speed-data-")))[DOMAIN]
    examples = tokenize_examples(load_examples(paths[0]), tokenizer, max_length=train.max_length)
    lr = train.learning_rate_for("qwen" if shaped else args.base_model)
    setup = LoopSetup(examples, lora, train, lr, tokenizer.pad_token_id, device)
    arms = {PLAIN: plain_step(base_model(args.base_model, shaped, device), setup)}
    for name, packing, loss in FEDMOE_ARMS:
        model = base_model(args.base_model, shaped, device)
        arms[name] = fedmoe_step(model, setup, packing, loss)
    if shaped and device.type == "cpu":
        rounds, chunk, warmup = 2, 1, 1
    else:
        rounds, chunk, warmup = (4, 10, 2) if args.quick else (6, 25, 2)
    speeds = interleaved(arms, rounds, chunk, device, warmup)
    default = default_arm(device)
    plain, ours = speeds[PLAIN], speeds[default]
    worker = None
    if not shaped:
        before = interleaved({"plain": arms[PLAIN]}, 1, chunk * 8, device)
        job = real_worker(args.base_model, paths, train, 33.0 if args.quick else 45.0, str(device))
        after = interleaved({"plain": arms[PLAIN]}, 1, chunk * 8, device)
        bracket = (before["plain"] + after["plain"]) / 2
        worker = {
            "tokens_per_second": job["tokens_per_second"],
            "ratio_to_bracket": job["tokens_per_second"] / bracket,
            "train_seconds": job["train_seconds"],
            "sync_interval": DEMO_SYNC_INTERVAL,
            "uploads": job["uploads"],
            "blocked_seconds": job["blocked_seconds"],
            "blocked_share": job["blocked_share"],
            "summary_blocked_share": job["summary"]["blocked_share"],
            "summary_tokens_per_second": job["summary"]["tokens_per_second"],
            "plain_before": before["plain"],
            "plain_after": after["plain"],
            "load_robust_ratio": ours / plain * (1 - job["blocked_share"]),
        }
    ddp = None if shaped else ddp_scaling(paths[0], train, 15 if args.quick else 40)
    values = {
        "shaped": shaped,
        "ddp": ddp,
        "default_arm": default,
        "base_model": args.base_model,
        "lora_rank": lora.rank,
        "device": str(device),
        "batch_size": train.batch_size,
        "max_length": train.max_length,
        "lr": lr,
        "domain": DOMAIN,
        "seed": train.seed,
        "max_grad_norm": train.max_grad_norm,
        "rounds": rounds,
        "chunk": chunk,
        "warmup": warmup,
        "arms": [
            {"arm": name, "tokens_per_second": value, "ratio": value / plain}
            for name, value in speeds.items()
        ],
        "loop_ratio": ours / plain,
        "worker": worker,
        "cuda": device.type == "cuda",
        "load_before": load_before,
        "load_after": list(os.getloadavg()),
        "wall_seconds": time.monotonic() - started,
    }
    if shaped and device.type == "cpu":
        print(json.dumps(values, indent=2) + "\n(CPU smoke run: not recorded)")
        return
    name = "worker-speed-qwen05b" if shaped else "worker-speed"
    publish(name, "Worker speed", values, args)


if __name__ == "__main__":
    main()
