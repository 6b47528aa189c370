"""Opening a coordinator: load the base model once, lock and resume the state dir."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TextIO

from fedmoe.coordinator import errors
from fedmoe.coordinator.core import CentralCoordinator
from fedmoe.coordinator.ledger import Ledger
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.store import AdapterStore
from fedmoe.modeling import initial_adapter, load_base_model


def open_coordinator(settings: CoordinatorSettings) -> CentralCoordinator:
    """Load the base model, derive the initial adapter and open (or resume) the state dir."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_state_dir(settings.state_dir)  # first: fail fast when the dir is in use
    try:
        coordinator = _open_locked(settings)
    except BaseException:
        lock.close()  # a refused state dir is left as it was, and free for the next try
        raise
    coordinator.state_lock = lock  # held for the life of the process
    return coordinator


def _open_locked(settings: CoordinatorSettings) -> CentralCoordinator:
    base = load_base_model(settings.base_model, device="cpu")
    initial = initial_adapter(base, settings.lora())
    fingerprint = base.fingerprint
    hidden_size = int(base.model.config.hidden_size)  # the dimension of domain signatures
    del base  # the coordinator never runs the model; free its memory
    ledger = Ledger(settings.state_dir / "ledger.sqlite3")
    store = AdapterStore(settings.state_dir, gateway_file_interval=settings.gateway_file_interval)
    try:
        coordinator = CentralCoordinator(
            settings=settings,
            base_model=settings.base_model,
            fingerprint=fingerprint,
            initial=initial,
            ledger=ledger,
            store=store,
        )
        coordinator.signatures.hidden_size = hidden_size
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
