"""Opening a coordinator: load the base model once, lock and resume the state dir."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from fedmoe.aggregate import AdapterState
from fedmoe.coordinator import errors
from fedmoe.coordinator.core import CentralCoordinator
from fedmoe.coordinator.ledger import Ledger
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.store import AdapterStore
from fedmoe.modeling import initial_adapter, load_base_model
from fedmoe.schemas import LoraConfigBody, RegistrationAck, WorkerRegistration


@dataclass(frozen=True)
class BaseFacts:
    """What the coordinator needs of the base model (it never runs it)."""

    initial: AdapterState  # the seeded initial adapter every expert starts from
    fingerprint: str
    hidden_size: int | None  # the dimension of domain signatures (None: the first one's)


# The base facts for some settings; benchmarks pass a synthetic source (no model loaded)
InitialSource = Callable[[CoordinatorSettings], BaseFacts]


def base_model_initial(settings: CoordinatorSettings) -> BaseFacts:
    """Load the base model once: its seeded initial adapter, fingerprint and hidden size."""
    base = load_base_model(settings.base_model, device="cpu")
    hidden_size = int(base.model.config.hidden_size)
    return BaseFacts(initial_adapter(base, settings.lora), base.fingerprint, hidden_size)


def open_coordinator(
    settings: CoordinatorSettings, initial_source: InitialSource = base_model_initial
) -> CentralCoordinator:
    """Derive the initial adapter (default: from the base model), open or resume the state dir."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_state_dir(settings.state_dir)  # first: fail fast when the dir is in use
    try:
        coordinator = _open_locked(settings, initial_source)
    except BaseException:
        lock.close()  # a refused state dir is left as it was, and free for the next try
        raise
    coordinator.state_lock = lock  # held for the life of the process
    return coordinator


def _open_locked(
    settings: CoordinatorSettings, initial_source: InitialSource
) -> CentralCoordinator:
    # the base model is loaded (and freed) inside: the coordinator never runs it
    base = initial_source(settings)
    ledger = Ledger(settings.state_dir / "ledger.sqlite3")
    store = AdapterStore(settings.state_dir, gateway_file_interval=settings.gateway_file_interval)
    try:
        coordinator = CentralCoordinator(
            settings=settings,
            base_model=settings.base_model,
            fingerprint=base.fingerprint,
            initial=base.initial,
            ledger=ledger,
            store=store,
        )
        coordinator.signatures.hidden_size = base.hidden_size
        return coordinator
    except BaseException:
        store.close()
        ledger.close()
        raise


def lock_state_dir(state_dir: Path) -> TextIO:
    """Take an exclusive lock so that two coordinators never share a state dir."""
    handle = open(state_dir / "coordinator.lock", "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise errors.StateDirError(
            f"state dir {state_dir} is in use by {owner}; stop it or use another --state-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"coordinator pid {os.getpid()}\n")
    handle.flush()
    return handle


def register_in_process(
    coordinator: CentralCoordinator, worker_id: str, specialty: str
) -> RegistrationAck:
    """Register a worker on an in-process coordinator with the coordinator's own base-model
    fingerprint and LoRA config (simulations and tests that drive the core without HTTP)."""
    return coordinator.register_worker(
        WorkerRegistration(
            worker_id=worker_id,
            specialty=specialty,
            base_model_fingerprint=coordinator.fingerprint,
            lora_config=LoraConfigBody.model_validate(coordinator.lora.to_dict()),
        )
    )
