"""The coordinator's answer to "what changed in this expert since version V".

The steps come from the write-ahead log (``Journal.recent``: the newest applied updates
with where their bodies lie). The answer is the full expert instead when V is older than
what the index still covers, when the strategy is not the plain rule θ + w·Δ (a server
optimizer or a FedBuff buffer does not step by the uploads' deltas), or when the steps
would be as big as the float32 expert, or when a step closed a FedAvg round that began
before V.
"""

from __future__ import annotations

import logging

from fedmoe.coordinator.journal import Journal, LogEntry
from fedmoe.coordinator.versions import Versioned
from fedmoe.deltas import encode_steps
from fedmoe.server_strategy import AsyncStrategy, Strategy

logger = logging.getLogger(__name__)


def steps_since(
    journal: Journal,
    name: str,
    expert: Versioned,
    strategy: Strategy,
    since: int,
    exclude: str | None,
) -> bytes | None:
    """The encoded steps from ``since`` to ``expert``, or None: send the full expert."""
    plain = isinstance(strategy, AsyncStrategy) and not strategy.optimizer.stateful
    if not plain or since > expert.version:  # the update screen keeps θ + w·Δ
        return None
    entries = [e for e in list(journal.recent[name]) if since < e.version <= expert.version]
    if [e.version for e in entries] != list(range(since + 1, expert.version + 1)):
        return None  # older than the index, or a flush in between
    if any(e.close is not None and e.close.base < since for e in entries):
        return None  # a FedAvg round that started before ``since``: we lack its start
    sent = [e for e in entries if e.update_id != exclude]
    if sum(e.body_len for e in sent) >= len(expert.payload):
        return None  # the steps would be bigger than the expert itself
    try:
        steps = [
            (e.update_id, e.weight, e.version, _body(journal, name, e, exclude), e.close)
            for e in entries
        ]
    except OSError as error:  # a segment dropped meanwhile (delta_retention=drop)
        logger.info("steps of %s since v%d unavailable (%s): full answer", name, since, error)
        return None
    return encode_steps(since, expert.version, steps)


def _body(journal: Journal, name: str, entry: LogEntry, exclude: str | None) -> bytes | None:
    return None if entry.update_id == exclude else journal.read_body(name, entry)
