"""Resuming a state dir: check that it was made for this model and LoRA, load the experts."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path

from fedmoe.adapters import AdapterSchema, schema_of
from fedmoe.config import LoraSettings
from fedmoe.coordinator import errors
from fedmoe.coordinator.ledger import Ledger
from fedmoe.coordinator.store import AdapterStore
from fedmoe.coordinator.versions import Versioned

logger = logging.getLogger(__name__)


def check_identity(ledger: Ledger, state_dir: Path, *, fingerprint: str, lora: LoraSettings) -> str:
    """The state dir's run id; a new dir is stamped, a foreign one refused with what differs."""
    identity = {
        "base_model_fingerprint": fingerprint,
        "lora": json.dumps(lora.to_dict(), sort_keys=True),
    }
    stored = {key: ledger.get_meta(key) for key in identity}
    if all(value is None for value in stored.values()):
        ledger.set_meta({**identity, "run_id": uuid.uuid4().hex[:12]})
    elif stored != identity:
        differing = [key for key in identity if stored[key] != identity[key]]
        raise errors.StateDirError(
            f"state dir {state_dir} was made with a different {differing}; "
            "use another --state-dir or the original base model and LoRA settings"
        )
    return ledger.get_meta("run_id") or ""


def warn_unserved(ledger: Ledger, names: Sequence[str]) -> None:
    """Warn about experts the state dir holds but the settings do not serve."""
    rows = ledger.expert_rows()
    for name in sorted(set(rows) - set(names)):
        logger.warning(
            "state dir holds expert %s (v%d), not in --experts: kept on disk, not served "
            "and not in the gateway",
            name,
            rows[name]["version"],
        )


def load_expert(store: AdapterStore, name: str, version: int, schema: AdapterSchema) -> Versioned:
    """One expert version from its file, which must be intact and match ``schema``."""
    path = store.expert_path(name, version)
    try:
        expert = Versioned.from_payload(version, store.read_expert(name, version), name=name)
        if schema_of(expert.state) != schema:
            raise ValueError("its tensor names or shapes differ from this LoRA config")
    except (OSError, ValueError) as error:
        raise errors.StateDirError(
            f"cannot restore expert {name} v{version} from {path}: {error}. The ledger "
            "says this file is current; restore the state dir from a backup or start "
            "a new one with another --state-dir"
        ) from None
    return expert
