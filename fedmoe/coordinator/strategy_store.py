"""Durable strategy state: one safetensors file per expert and snapshot (``seq`` = the
snapshot's log sequence number; ``fedmoe.coordinator.journal``).

Written like the experts (temp file, fsync, rename) before the ``snapshots`` row that
makes it current; files of other versions are leftovers and are removed. Scalars (the
buffer's update ids, mass, age, the optimizer's step count) travel in the metadata.
``restore_states`` reads a state dir written before the log (table ``strategy_state``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save

from fedmoe.adapters import atomic_write, prune_versions
from fedmoe.coordinator import errors
from fedmoe.coordinator.ledger import Ledger
from fedmoe.coordinator.ledger_rows import StrategyRow
from fedmoe.coordinator.replay import replay_description
from fedmoe.server_strategy import Strategy, StrategyState

logger = logging.getLogger(__name__)


# what identifies a strategy's state: a buffer or moments of another one do not fit
IDENTITY = ("strategy", "optimizer", "momentum", "robust", "screen")


def describe(strategy: Strategy) -> dict[str, Any]:
    """The identifying part of ``replay_description``: the state's kind, not its rates."""
    full = replay_description(strategy)
    return {key: full[key] for key in IDENTITY if key in full} | {
        "buffer_size": strategy.buffer_size
    }


class StrategyStore:
    """Strategy state files under ``<state_dir>/strategy``."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = Path(state_dir) / "strategy"
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str, seq: int) -> Path:
        """Where state version ``seq`` of expert ``name`` lives."""
        return self.directory / f"{name}.s{seq:010d}.safetensors"

    def save(self, name: str, seq: int, state: StrategyState) -> None:
        """Durably write one state version (before the ledger says it is current)."""
        atomic_write(self.path(name, seq), save(state.tensors(), metadata=state.scalars()))

    def load(self, name: str, seq: int) -> StrategyState:
        """One state version, bit for bit as saved (safetensors: no pickle)."""
        with safe_open(str(self.path(name, seq)), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            metadata = handle.metadata() or {}
        return StrategyState.from_parts(tensors, metadata)

    def prune(self, name: str, keep_seq: int) -> None:
        """Remove every state file of ``name`` except ``keep_seq`` (and temp files)."""
        prune_versions(self.directory, name, "s", self.path(name, keep_seq))


def restore_states(
    ledger: Ledger, store: StrategyStore, names: list[str], strategy: Strategy
) -> tuple[dict[str, StrategyState], dict[str, int]]:
    """Every expert's strategy state and its seq as the ledger records them.

    State written by a different strategy is dropped (with a warning) unless it holds
    acknowledged buffered updates, which must not be lost: then start-up is refused.
    """
    rows, wanted = ledger.strategy_rows(), describe(strategy)
    states: dict[str, StrategyState] = {}
    seqs: dict[str, int] = {}
    for name in names:
        row = rows.get(name)
        seqs[name] = row.seq if row else 0
        states[name] = _restore_one(store, name, row, wanted)
        store.prune(name, seqs[name])
    return states, seqs


def _restore_one(
    store: StrategyStore, name: str, row: StrategyRow | None, wanted: dict[str, Any]
) -> StrategyState:
    if row is None:
        return StrategyState()
    if json.loads(row.strategy) != wanted:
        if row.buffer_fill:
            raise errors.StateDirError(
                f"expert {name} has {row.buffer_fill} acknowledged update(s) buffered by "
                f"strategy {row.strategy}; restart with that strategy until the buffer is "
                f"applied (it is applied after --buffer-timeout), not with {wanted}"
            )
        logger.warning(
            "expert %s: strategy changed from %s; its state starts anew", name, row.strategy
        )
        return StrategyState()
    try:
        return store.load(name, row.seq)
    except (OSError, ValueError, KeyError) as error:
        raise errors.StateDirError(
            f"cannot restore the strategy state of expert {name} from "
            f"{store.path(name, row.seq)}: {error}. The ledger says this file is current; "
            "restore the state dir from a backup or start a new one"
        ) from None
