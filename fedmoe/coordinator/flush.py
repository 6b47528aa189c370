"""Applying FedBuff buffers that waited ``--buffer-timeout`` with no upload to fill them.

``BufferTimer`` runs a thread that looks at every expert's buffer a few times per timeout
and applies a due one as a new version, durably, as the update path commits an update:
a ``flush`` record in the write-ahead log, its ledger row, a new gateway version.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING

from fedmoe import aggregate
from fedmoe.aggregate import AdapterState
from fedmoe.coordinator import errors
from fedmoe.coordinator.versions import Versioned
from fedmoe.server_strategy import FedBuffStrategy

if TYPE_CHECKING:
    from fedmoe.coordinator.core import CentralCoordinator

logger = logging.getLogger(__name__)


class BufferTimer:
    """The coordinator's timer for FedBuff buffers (started by ``start``)."""

    def __init__(self, coordinator: CentralCoordinator, strategy: FedBuffStrategy) -> None:
        self.coordinator, self.strategy = coordinator, strategy
        self._closing = threading.Event()
        period = min(5.0, strategy.timeout / 4)
        self._thread = threading.Thread(
            target=self._loop, args=(period,), name="buffer-timer", daemon=True
        )

    def start(self) -> None:
        """Look for due buffers from now on."""
        self._thread.start()

    def close(self) -> None:
        """Stop looking (a flush in progress finishes first)."""
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self, period: float) -> None:
        while not self._closing.wait(period):
            try:
                self.flush_due_buffers()
            except Exception:  # e.g. a full disk: the buffer stays, the next tick retries
                logger.exception("could not apply a timed-out buffer")

    def flush_due_buffers(self) -> list[str]:
        """Apply every buffer that has waited --buffer-timeout; the experts flushed."""
        coordinator, flushed = self.coordinator, []
        strategies = coordinator.strategies
        for name in coordinator.settings.experts:
            with coordinator._expert_locks[name]:
                state = strategies.states[name]
                if self.strategy.due(state, time.time()) and not self._closing.is_set():
                    lr = strategies.flush_lr(name, len(state.update_ids))
                    params, emptied = self.strategy.apply(
                        coordinator.experts[name].state, state, lr
                    )
                    self._commit(name, params, lr)
                    strategies.publish(name, emptied, coordinator.journal.lsns[name])
                    flushed.append(name)
        return flushed

    def _commit(self, name: str, params: AdapterState, lr: float) -> None:
        """Durably publish an expert stepped by a timed-out buffer, as the update path does."""
        coordinator = self.coordinator
        bound = aggregate.max_abs(params)
        if not math.isfinite(bound) or not coordinator._gateway_is_finite({name: (params, bound)}):
            raise errors.InvalidUpdateError(f"the buffer of {name} would overflow float32")
        version = coordinator.experts[name].version + 1
        with coordinator._commit_lock:
            experts = {**coordinator.experts, name: Versioned(version, params, bound, name=name)}
            built_from = coordinator._built_from(experts)
            gateway = coordinator._gateway(coordinator.gateway.version + 1, built_from, experts)
            appended = coordinator.journal.append_flush(name, version, lr)
            try:
                coordinator.ledger.commit_flush(name, version, gateway.version, built_from)
            except BaseException:
                coordinator.journal.undo(name, appended)
                raise
            coordinator.journal.committed(name)
            coordinator.experts, coordinator.gateway = experts, gateway
            if coordinator.settings.eager_gateway:
                coordinator.store.save_gateway_later(gateway)
        logger.info("applied the timed-out buffer of %s: version %d", name, version)
