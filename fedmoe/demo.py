"""The demo: three domains, a coordinator and three workers on loopback, then a loss table.

Datasets are generated (``fedmoe.demo_data``), so the demo runs offline. Every
process is a real ``fedmoe`` subprocess talking HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fedmoe.adapters import write_peft_dir
from fedmoe.aggregate import AdapterState
from fedmoe.batching import tokenize_examples
from fedmoe.client import CoordinatorClient
from fedmoe.config import LoraSettings
from fedmoe.data import load_examples
from fedmoe.demo_data import DOMAINS, write_demo_datasets
from fedmoe.evaluation import validation_loss
from fedmoe.modeling import load_base_model
from fedmoe.procs import spawn, start_coordinator
from fedmoe.routed_eval import accuracy, route_examples, routed_loss
from fedmoe.routing import RouteDecision, Router, router_from_payload
from fedmoe.strategy import MERGE_METHODS, GatewayMerge

logger = logging.getLogger(__name__)


@dataclass
class DemoRun:
    """setup → train → evaluate → cleanup, leaving the gateway as a PEFT directory."""

    output: Path
    seconds: float = 150.0
    sync_interval: float = 10.0
    base_model: str = "tiny"
    merge_method: str = "cat"
    train_count: int = 400
    validation_count: int = 60
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    routing_accuracy: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # refused before any file is written or process started, naming the option
        positive = {"seconds": self.seconds, "sync_interval": self.sync_interval}
        counts = {"train_count": self.train_count, "validation_count": self.validation_count}
        for name, value in (positive | counts).items():
            if not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.merge_method not in MERGE_METHODS:
            raise ValueError(
                f"merge method must be one of {MERGE_METHODS}, got {self.merge_method!r}"
            )
        if self.output.exists() and not self.output.is_dir():
            raise ValueError(f"--output {self.output} exists and is not a directory")

    def setup(self) -> None:
        """Generate the datasets and start the coordinator."""
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "logs").mkdir(exist_ok=True)
        self.datasets = write_demo_datasets(
            self.output / "data",
            train_count=self.train_count,
            validation_count=self.validation_count,
        )
        state = self.output / f"state-{int(time.time())}"
        coordinator, self.url = start_coordinator(
            state,
            self.output / "logs" / "coordinator.log",
            "--base-model",
            self.base_model,
            "--merge-method",
            self.merge_method,
            "--experts",
            ",".join(DOMAINS),
        )
        self.processes.append(coordinator)
        logger.info("coordinator up at %s", self.url)
        logger.info("live dashboard: %s/ui/ (open it while the demo trains)", self.url)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = self.output / "logs" / f"{name}.log"
        process = spawn([sys.executable, "-m", "fedmoe", *args], log)
        self.processes.append(process)
        return process

    def train(self) -> list[dict[str, Any]]:
        """Run one worker per domain for ``seconds`` and collect their summaries."""
        workers = []
        for index, domain in enumerate(DOMAINS, start=1):
            train_path, validation_path = self.datasets[domain]
            summary = self.output / "logs" / f"worker-{index}.json"
            workers.append(
                (
                    summary,
                    self._spawn(
                        f"worker-{index}",
                        [
                            "worker",
                            "--coordinator-url",
                            self.url,
                            "--worker-id",
                            f"Worker-{index}-{domain}",
                            "--specialty",
                            domain,
                            "--dataset",
                            str(train_path),
                            "--eval-dataset",
                            str(validation_path),
                            "--sync-interval",
                            str(self.sync_interval),
                            "--eval-max-examples",  # federated evaluation: ~1/min, cheap
                            "30",
                            "--max-seconds",
                            str(self.seconds),
                            "--threads",
                            "1",
                            "--summary-json",
                            str(summary),
                        ],
                    ),
                )
            )
        summaries = []
        for summary, process in workers:
            if process.wait() != 0:
                raise RuntimeError(f"a worker failed; see {self.output / 'logs'}")
            summaries.append(json.loads(summary.read_text()))
        return summaries

    def cleanup(self) -> None:
        """Stop every process this demo started."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Validation loss per domain for the base, each expert and each gateway merge."""
        with CoordinatorClient(self.url) as client:
            schema = client.schema()
            shapes = {k: tuple(v) for k, v in schema.tensors.items()}
            experts = {d: client.expert_adapter(d, shapes)[1] for d in DOMAINS}
            self.gateway_dir = self.output / "gateway"
            from fedmoe.export import fetch_adapter_dir

            fetch_adapter_dir(client, self.gateway_dir)
            router = router_from_payload(client.signatures())
        lora = LoraSettings.from_dict(schema.lora_config.model_dump())
        adapters = {
            f"expert:{d}": self._export(d, state, lora, lora.rank, lora.alpha)
            for d, state in experts.items()
        }
        for method in MERGE_METHODS:
            merger = GatewayMerge(method=method, lora=lora)
            state = merger.merge(list(experts.values()), [1.0] * len(experts))
            rank, alpha = merger.gateway_rank_alpha(len(experts))
            adapters[f"gateway:{method}"] = self._export(
                f"gateway-{method}", state, lora, rank, alpha
            )
        table = self._loss_table(adapters)
        if router is not None:  # every worker had enough data to send a signature
            table["gateway: routed"] = self._routed_row(router, adapters, experts, lora)
        return table

    def _routed_row(
        self,
        router: Router,
        adapters: dict[str, Path],
        experts: dict[str, AdapterState],
        lora: LoraSettings,
    ) -> dict[str, float]:
        """Loss when each validation example is answered as the router decides; accuracy."""
        base = load_base_model(self.base_model, device="cpu")
        models: dict[str, PeftModel] = {}

        def model_for(decision: RouteDecision) -> tuple[str, PeftModel]:
            if decision.expert is not None:
                key, directory = decision.expert, adapters[f"expert:{decision.expert}"]
            elif decision.fallback == "merged":
                key, directory = "merged", adapters[f"gateway:{self.merge_method}"]
            else:  # a weighted cat mix of the top experts
                key = "mix:" + ",".join(f"{n}={w:.3f}" for n, w in decision.weights.items())
                merger = GatewayMerge(method="cat", lora=lora)
                state = merger.merge(
                    [experts[n] for n in decision.weights], [*decision.weights.values()]
                )
                rank, alpha = merger.gateway_rank_alpha(len(decision.weights))
                directory = self._export(f"mix-{len(models)}", state, lora, rank, alpha)
            if key not in models:
                fresh = load_base_model(self.base_model, device="cpu").model
                models[key] = PeftModel.from_pretrained(fresh, str(directory))
            return key, models[key]

        row, self.routing_accuracy = {}, {}
        for domain in DOMAINS:
            examples = load_examples(self.datasets[domain][1])
            decisions = route_examples(router, base.model, base.tokenizer, examples)
            row[domain] = routed_loss(decisions, examples, base.tokenizer, model_for)
            self.routing_accuracy[domain] = accuracy(decisions, domain)
        return row

    def _export(
        self, name: str, state: AdapterState, lora: LoraSettings, rank: int, alpha: float
    ) -> Path:
        return write_peft_dir(
            state,
            lora,
            self.output / "adapters" / name,
            base_model=self.base_model,
            rank=rank,
            alpha=alpha,
        )

    def _loss_table(self, adapters: dict[str, Path]) -> dict[str, dict[str, float]]:
        base = load_base_model(self.base_model, device="cpu")
        sets = {
            d: tokenize_examples(load_examples(self.datasets[d][1]), base.tokenizer, max_length=256)
            for d in DOMAINS
        }
        pad = base.tokenizer.pad_token_id
        table = {
            "base": {d: validation_loss(base.model, s, pad_token_id=pad) for d, s in sets.items()}
        }
        for name, directory in adapters.items():
            model = PeftModel.from_pretrained(
                load_base_model(self.base_model, device="cpu").model, str(directory)
            )
            table[name] = {d: validation_loss(model, s, pad_token_id=pad) for d, s in sets.items()}
        return table


def verdicts(table: dict[str, dict[str, float]]) -> list[tuple[str, bool]]:
    """The demo's claims: each expert beats the base on its domain, gateways on all three."""
    base = table["base"]
    claims = [
        (f"expert {d} beats the base on {d}", table[f"expert:{d}"][d] < base[d]) for d in DOMAINS
    ]
    for name in (n for n in table if n.startswith("gateway:")):
        claims.append(
            (
                f"{name} beats the base on every domain",
                all(table[name][d] < base[d] for d in DOMAINS),
            )
        )
    return claims


def run_demo(run: DemoRun) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Run the whole demo and return (loss table, worker summaries)."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        run.setup()
        summaries = run.train()
        table = run.evaluate()
    finally:
        run.cleanup()
    results = {
        "table": table,
        "workers": summaries,
        "claims": dict(verdicts(table)),
        "routing_accuracy": run.routing_accuracy,
    }
    (run.output / "results.json").write_text(json.dumps(results, indent=2))
    return table, summaries
