"""Opening a coordinator: the base model's facts (kept, else loaded once), lock and resume
the state dir.

transformers and peft (``fedmoe.modeling``) are imported only when the base facts must be
derived: a coordinator whose facts are kept (``fedmoe.coordinator.base_facts``) starts
without them.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from fedmoe.coordinator import errors
from fedmoe.coordinator.base_facts import BaseFacts as BaseFacts
from fedmoe.coordinator.base_facts import Recalled, recall_base_facts
from fedmoe.coordinator.core import CentralCoordinator
from fedmoe.coordinator.ledger import Ledger
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.store import AdapterStore
from fedmoe.schemas import LoraConfigBody, RegistrationAck, WorkerRegistration

# The base facts for some settings; benchmarks pass a synthetic source (no model loaded)
InitialSource = Callable[[CoordinatorSettings], BaseFacts]


def base_model_initial(settings: CoordinatorSettings) -> BaseFacts:
    """Load the base model once: its seeded initial adapter, fingerprint and hidden size."""
    from fedmoe.modeling import initial_adapter, load_base_model  # transformers: only here

    base = load_base_model(settings.base_model, device="cpu")
    hidden_size = int(base.model.config.hidden_size)
    initial = initial_adapter(base, settings.lora)
    return BaseFacts(initial, base.fingerprint, hidden_size, settings.lora.peft_dict())


def open_coordinator(
    settings: CoordinatorSettings, initial_source: InitialSource | None = None
) -> CentralCoordinator:
    """Get the base facts, open or resume the state dir.

    Default: the facts kept in the state dir or the shared cache, else derived from the
    base model (``base_model_initial``) and kept; a given ``initial_source`` is used as is.
    """
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
    settings: CoordinatorSettings, initial_source: InitialSource | None
) -> CentralCoordinator:
    # the base model, when loaded at all, is loaded (and freed) inside: the coordinator
    # never runs it
    recalled: Recalled | None = None
    if initial_source is None:
        recalled = recall_base_facts(settings, base_model_initial)
        base = recalled.facts
    else:
        base = initial_source(settings)
    ledger = Ledger(settings.state_dir / "ledger.sqlite3")
    store = AdapterStore(settings.state_dir, gateway_file_interval=settings.gateway_file_interval)
    try:
        coordinator = CentralCoordinator(
            settings=settings,
            base=base,
            ledger=ledger,
            store=store,
        )
    except BaseException:
        store.close()
        ledger.close()
        raise
    if recalled is not None:
        recalled.keep()  # only now: a state dir that refused these facts is left as it was
    return coordinator


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
