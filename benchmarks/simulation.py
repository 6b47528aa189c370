"""A virtual-clock simulator of a FedMoE federation, for the quality and asynchrony benchmarks.

It runs many FedMoE workers in ONE process on one shared PEFT model (each worker keeps
its own adapter state, AdamW optimizer and batch stream, swapped in when it steps).
Every training step is a real ``LocalTrainer.step``; a worker's own virtual clock
advances by the step's cost × its slowdown. Uploads go through the real
``CentralCoordinator`` (staleness decay, update rule, ledger, lazy gateway) in
virtual-time order, so staleness arises exactly as it would between real processes.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from fedmoe import aggregate
from fedmoe.adapters import encode_adapter
from fedmoe.aggregate import AdapterState
from fedmoe.batching import TokenizedExample
from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.coordinator.bootstrap import (
    BaseFacts,
    base_model_initial,
    open_coordinator,
    register_in_process,
)
from fedmoe.coordinator.core import CentralCoordinator
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.versions import UpdateRequest
from fedmoe.demo_data import DOMAINS
from fedmoe.modeling import adapter_state, attach_lora, load_adapter_state, load_base_model
from fedmoe.schemas import UpdateAck
from fedmoe.worker.options import default_pull_wait
from fedmoe.worker.trainer import LocalTrainer, StepResult

# --- workers on a shared model ---------------------------------------------------------------


@dataclass(eq=False)
class SimWorker:
    """One emulated worker: its expert, speed, adapter state, trainer and virtual clock."""

    name: str
    expert: str
    trainer: LocalTrainer
    slowdown: float = 1.0
    state: AdapterState = field(default_factory=dict)
    pulled: AdapterState = field(default_factory=dict)
    base_version: int = 0
    clock: float = 0.0
    next_sync: float = 0.0
    tokens: int = 0
    steps: int = 0
    window_tokens: int = 0
    window_losses: list[float] = field(default_factory=list)
    blocked: bool = False
    done: bool = False
    # an acknowledged upload whose pull waits for the round: (settle version, wall-clock
    # deadline, the snapshot it rebases from)
    settling: tuple[int, float, AdapterState] | None = None
    staleness: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


class Workbench:
    """One PEFT model that hosts the training of many ``SimWorker``s in turn."""

    def __init__(
        self, base_model: str, lora: LoraSettings | None = None, train: TrainSettings | None = None
    ) -> None:
        lora, train = lora or LoraSettings(), train or TrainSettings()
        self.base_name, self.lora, self.train = base_model, lora, train
        base = load_base_model(base_model, device="cpu")
        self.tokenizer, self.pad = base.tokenizer, base.tokenizer.pad_token_id
        self.model = attach_lora(base.model, lora)
        self.initial = adapter_state(self.model)
        self.occupant: SimWorker | None = None
        self.learning_rate = train.learning_rate_for(base_model)

    def worker(
        self,
        name: str,
        expert: str,
        examples: list[TokenizedExample],
        *,
        slowdown: float = 1.0,
        seed: int | None = None,
    ) -> SimWorker:
        """A worker with its own optimizer and batch stream, starting from the initial adapter.

        ``seed`` replaces ``TrainSettings.seed`` (the order of its batches).
        """
        train = self.train if seed is None else self.train.model_copy(update={"seed": seed})
        trainer = LocalTrainer(
            self.model,
            examples,
            train,
            pad_token_id=self.pad,
            device=torch.device("cpu"),
            learning_rate=self.learning_rate,
        )
        return SimWorker(name, expert, trainer, slowdown, dict(self.initial), dict(self.initial))

    def step(self, worker: SimWorker) -> tuple[StepResult, float]:
        """One real optimizer step of ``worker``; returns it and its compute seconds."""
        if self.occupant is not worker:
            if self.occupant is not None:
                self.occupant.state = adapter_state(self.model)
            load_adapter_state(self.model, worker.state)
            self.occupant = worker
        began = time.perf_counter()
        result = worker.trainer.step()
        seconds = time.perf_counter() - began
        worker.steps += 1
        worker.tokens += result.tokens
        worker.window_tokens += result.tokens
        worker.window_losses.append(result.loss)
        return result, seconds

    def state_of(self, worker: SimWorker) -> AdapterState:
        """The worker's current adapter (a copy)."""
        return adapter_state(self.model) if self.occupant is worker else dict(worker.state)

    def set_state(self, worker: SimWorker, state: AdapterState) -> None:
        """Replace the worker's adapter (its optimizer state is kept, as in ``WorkerJob``)."""
        worker.state = dict(state)
        if self.occupant is worker:
            load_adapter_state(self.model, state)

    def calibrate(self, examples: list[TokenizedExample], steps: int = 12) -> float:
        """Median compute seconds of a training step on ``examples`` on this machine."""
        probe = self.worker("calibration", "none", examples)
        seconds = [self.step(probe)[1] for _ in range(steps)]
        self.occupant = None
        return statistics.median(seconds[2:])


# --- the coordinator, in process -------------------------------------------------------------


class Coordinator:
    """The real ``CentralCoordinator`` (no HTTP) in a temporary state dir.

    The base model's facts (initial adapter, fingerprint) are derived once per process and
    shared by every coordinator opened with the same base model and LoRA settings.
    """

    _facts: ClassVar[dict[str, BaseFacts]] = {}

    def __init__(
        self,
        bench: Workbench,
        *,
        staleness: str = "inverse",
        a: float | None = None,
        **strategy: object,
    ):
        settings = CoordinatorSettings(
            state_dir=Path(tempfile.mkdtemp(prefix="fedmoe-bench-state-")),
            base_model=bench.base_name,
            experts=list(DOMAINS),
            lora_rank=bench.lora.rank,
            lora_alpha=bench.lora.alpha,
            lora_target_modules=list(bench.lora.target_modules),
            staleness=staleness,
            staleness_a=a,
            # --server-lr, --strategy, --buffer-size, ...; what is not given: the defaults
            **strategy,
        )
        key = settings.model_dump_json(include={"base_model", "lora"})
        if key not in Coordinator._facts:
            Coordinator._facts[key] = base_model_initial(settings)
        self.core: CentralCoordinator = open_coordinator(
            settings, lambda _: Coordinator._facts[key]
        )

    def register(self, worker: SimWorker) -> None:
        """Register the worker and give it the expert's current version."""
        register_in_process(self.core, worker.name, worker.expert)
        worker.base_version, worker.pulled = self.pull(worker.expert)

    def pull(self, expert: str) -> tuple[int, AdapterState]:
        """The expert's version and state."""
        current = self.core.experts[expert]
        return current.version, current.state

    def upload(self, worker: SimWorker, delta: AdapterState) -> UpdateAck:
        """Submit ``delta`` as the worker's update (safetensors bytes, as over HTTP)."""
        losses = worker.window_losses
        return self.core.submit_update(
            UpdateRequest(
                expert=worker.expert,
                worker_id=worker.name,
                update_id=f"{worker.name}:{uuid.uuid4().hex}",
                base_version=worker.base_version,
                num_tokens=worker.window_tokens,
                final=worker.done,  # a finished worker's last upload, as on SIGTERM
                train_loss=sum(losses) / len(losses) if losses else None,
                body=encode_adapter(delta),
            )
        )

    def experts(self) -> list[AdapterState]:
        """Every expert's state, in ``DOMAINS`` order."""
        return [self.core.experts[d].state for d in DOMAINS]

    def close(self) -> None:
        """Flush and close the ledger and store."""
        self.core.close()


# --- the virtual-clock simulator -------------------------------------------------------------

CLOCK_SLACK = 1e-9  # virtual seconds: far below any step cost, far above float rounding

Observer = Callable[[float, list[AdapterState]], None]  # (virtual time, experts from then on)
# (worker, step, measured seconds) -> the step's virtual seconds before the worker's slowdown
StepCost = Callable[[SimWorker, StepResult, float], float]


def stop_rule(*, horizon: float | None, budget: int | None) -> Callable[[SimWorker], bool]:
    """A worker is finished at the virtual ``horizon`` or after ``budget`` target tokens."""

    def finished(worker: SimWorker) -> bool:
        if horizon is not None and worker.clock >= horizon:
            return True
        return budget is not None and worker.tokens >= budget

    return finished


def worker_side(settings: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """An arm's settings split into the coordinator's and the workers' ``pull_wait``."""
    options = dict(settings)
    return options, options.pop("pull_wait", None)


def run_async(
    bench: Workbench,
    coordinator: Coordinator,
    workers: list[SimWorker],
    *,
    sync_interval: float,
    cost: StepCost,
    finished: Callable[[SimWorker], bool],
    observe: Observer | None = None,
    pull_wait: float | None = None,
) -> None:
    """FedMoE's asynchronous protocol on virtual clocks (conservative event ordering).

    A worker trains until its clock passes its next sync time, then blocks with an
    upload stamped at that time. An upload is applied only once every worker that is
    still training has a clock at or past its stamp, so uploads reach the coordinator
    in virtual-time order. The worker then pulls the newest expert and rebases onto it,
    at once or, as a background sync does, once the acknowledgement's ``settle_version``
    is reached or ``pull_wait`` (virtual time; default the worker's, a fifth of the
    interval) has passed, training meanwhile.
    """
    wait = default_pull_wait(sync_interval) if pull_wait is None else pull_wait
    for worker in workers:
        coordinator.register(worker)
        bench.set_state(worker, worker.pulled)
        worker.next_sync = worker.clock + sync_interval
    pending: list[tuple[float, int, SimWorker]] = []
    sequence = 0
    while True:
        frontier = min((w.clock for w in workers if _training(w)), default=math.inf)
        pending.sort(key=lambda item: item[:2])
        while pending and pending[0][0] <= frontier:
            stamp, _, worker = pending.pop(0)
            _upload(bench, coordinator, worker, stamp, wait)
            worker.next_sync = stamp + sync_interval
            if observe:
                observe(stamp, coordinator.experts())
        for worker in workers:
            if worker.settling is not None:
                _settle_if_due(bench, coordinator, worker, frontier)
        active = [w for w in workers if _training(w)]
        if not active:
            if any(w.settling for w in workers):
                continue  # the last waits end now: nobody trains on
            return
        worker = min(active, key=lambda w: w.clock)
        result, seconds = bench.step(worker)
        worker.clock += cost(worker, result, seconds) * worker.slowdown
        worker.done = finished(worker)
        # summed step costs (0.05 s fifty times) round: due within that rounding
        if worker.done or worker.clock >= worker.next_sync - CLOCK_SLACK:
            worker.blocked = True
            pending.append((worker.clock, sequence, worker))
            sequence += 1


def _training(worker: SimWorker) -> bool:
    """Steps on: not blocked on an upload, not done, and not past a pull it waits for."""
    waiting = worker.settling is not None and worker.clock >= worker.settling[1]
    return not worker.blocked and not worker.done and not waiting


def _upload(
    bench: Workbench, coordinator: Coordinator, worker: SimWorker, stamp: float, wait: float
) -> None:
    """Send the worker's delta; pull now, or note the round it waits for (``settling``)."""
    snapshot = bench.state_of(worker)
    delta = {key: snapshot[key] - worker.pulled[key] for key in snapshot}
    ack = coordinator.upload(worker, delta)
    worker.staleness.append(ack.staleness)
    worker.weights.append(ack.weight)
    worker.window_tokens, worker.window_losses = 0, []
    worker.blocked = False
    others_due = ack.settle_version is not None and ack.settle_version > ack.version
    if others_due and wait > 0 and not worker.done:
        worker.settling = (ack.settle_version or 0, stamp + wait, snapshot)
    else:
        _rebase_onto_newest(bench, coordinator, worker, snapshot)


def _settle_if_due(
    bench: Workbench, coordinator: Coordinator, worker: SimWorker, frontier: float
) -> None:
    """Pull and rebase once the round is in or the wait is over (every upload stamped
    before then has been applied)."""
    assert worker.settling is not None
    version, deadline, snapshot = worker.settling
    if coordinator.core.experts[worker.expert].version < version and frontier < deadline:
        return
    worker.settling = None
    _rebase_onto_newest(bench, coordinator, worker, snapshot)


def _rebase_onto_newest(
    bench: Workbench, coordinator: Coordinator, worker: SimWorker, snapshot: AdapterState
) -> None:
    """Pull the expert and rebase the worker onto it: local ← newest + (local − snapshot)."""
    worker.base_version, newest = coordinator.pull(worker.expert)
    current = bench.state_of(worker)
    bench.set_state(worker, {k: newest[k] + (current[k] - snapshot[k]) for k in newest})
    worker.pulled = newest


def run_sync(
    bench: Workbench,
    workers: list[SimWorker],
    *,
    steps_per_round: int,
    cost: StepCost,
    finished: Callable[[SimWorker], bool],
    observe: Observer | None = None,
) -> list[AdapterState]:
    """The synchronous round-based baseline on the same virtual clocks.

    Every round all workers start from their expert, train ``steps_per_round`` steps,
    and wait for the slowest; each expert then moves by the token-weighted FedAvg of
    its workers' deltas (``aggregate.weighted_average`` + ``apply_update``). Returns
    the final experts in ``DOMAINS`` order.
    """
    experts = {d: dict(bench.initial) for d in DOMAINS}
    now = 0.0
    while not all(w.done for w in workers):
        deltas: dict[str, list[tuple[AdapterState, int]]] = {d: [] for d in DOMAINS}
        for worker in workers:
            worker.clock, before = now, worker.tokens
            worker.done = worker.done or finished(worker)
            if worker.done:
                continue
            bench.set_state(worker, experts[worker.expert])
            for _ in range(steps_per_round):
                result, seconds = bench.step(worker)
                worker.clock += cost(worker, result, seconds) * worker.slowdown
                if finished(worker):
                    worker.done = True
                    break
            snapshot = bench.state_of(worker)
            delta = {key: snapshot[key] - experts[worker.expert][key] for key in snapshot}
            deltas[worker.expert].append((delta, worker.tokens - before))
        if not any(deltas.values()):
            break
        now = max(w.clock for w in workers)
        for domain, items in deltas.items():
            if items:
                weights = aggregate.normalize_weights([float(n) for _, n in items])
                average = aggregate.weighted_average([d for d, _ in items], weights)
                experts[domain] = aggregate.apply_update(experts[domain], average, 1.0)
        if observe:
            observe(now, [experts[d] for d in DOMAINS])
    return [experts[d] for d in DOMAINS]
