"""The base model's facts a coordinator needs, kept so that a start need not load the model.

A coordinator never runs its base model, but needs three facts of it: the seeded initial
adapter every expert starts from, the model's fingerprint and its hidden size. Deriving
them loads the model (transformers + peft; 15 GB for a 7B model). They are kept:

- in the state dir (``base_facts/``), written once the state dir has accepted them, and
  used by every restart with the same base model, LoRA settings and library versions;
- in a shared cache (``--cache-dir``), keyed by a sha256 of that identity, only for base
  models whose identity is checked without loading them: the ``tiny`` preset (by its
  build version) and local model directories (resolved path, and the names, sizes and
  mtimes of their files). An HF hub id is not cached: its revision can move.

Each place holds ``initial.safetensors`` and ``facts.json`` (the identity, fingerprint,
hidden size and the sha256 of the tensors file), both written atomically. A missing,
foreign or unreadable entry is derived again from the model (logged) and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors

from fedmoe.adapters import atomic_write, encode_adapter
from fedmoe.aggregate import AdapterState
from fedmoe.presets import TINY_NAME, TINY_VERSION, check_local_name

if TYPE_CHECKING:
    from fedmoe.coordinator.settings import CoordinatorSettings

logger = logging.getLogger(__name__)

FACTS_FORMAT = 1
STATE_DIR_FACTS = "base_facts"  # under the state dir
TENSORS_FILE = "initial.safetensors"
FACTS_FILE = "facts.json"
# Packages whose versions can change the derived facts (peft's initialisation of LoRA A,
# the tiny preset's build, the fingerprint's bfloat16 cast).
LIBRARIES = ("torch", "transformers", "peft")


@dataclass(frozen=True)
class BaseFacts:
    """What the coordinator needs of the base model (it never runs it)."""

    initial: AdapterState  # the seeded initial adapter every expert starts from
    fingerprint: str
    hidden_size: int | None  # the dimension of domain signatures (None: the first one's)
    # PEFT's LoraConfig as a dict (None: made at start, which imports peft)
    peft_config: dict[str, Any] | None = None


def model_identity(name: str) -> dict[str, Any]:
    """What identifies base model ``name`` without loading it (``kind`` hub: only its name);
    FileNotFoundError for a path that does not exist."""
    if name == TINY_NAME:
        return {"kind": "preset", "name": name, "version": TINY_VERSION}
    check_local_name(name)  # a missing directory is named before anything is loaded
    path = Path(name).expanduser()
    if not path.is_dir():
        return {"kind": "hub", "name": name}
    root = path.resolve()
    files = []
    for file in sorted(root.rglob("*")):
        if file.is_file():
            stat = file.stat()
            files.append([file.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    return {"kind": "directory", "path": str(root), "files": files}


def facts_identity(settings: CoordinatorSettings) -> dict[str, Any]:
    """Everything the base facts are derived from: model identity, LoRA, library versions."""
    return {
        "format": FACTS_FORMAT,
        "model": model_identity(settings.base_model),
        "lora": settings.lora.to_dict(),
        "libraries": {name: version(name) for name in LIBRARIES},
    }


def cache_entry(cache_dir: Path, identity: dict[str, Any]) -> Path | None:
    """The shared cache's directory for ``identity``; None when it is not cacheable (hub)."""
    if identity["model"]["kind"] == "hub":
        return None
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return cache_dir.expanduser() / "base_facts" / key


def read_facts(directory: Path, identity: dict[str, Any], where: str) -> BaseFacts | None:
    """The facts kept in ``directory`` for ``identity``; None (logged) when absent or not
    usable: made for other settings, or unreadable."""
    facts_file = directory / FACTS_FILE
    if not facts_file.exists():
        return None
    try:
        stored = json.loads(facts_file.read_text())
        if stored.get("identity") != identity:
            differing = sorted(
                key for key in identity if stored.get("identity", {}).get(key) != identity[key]
            )
            logger.warning(
                "base facts in %s (%s) were derived for another %s: deriving them again "
                "from base model %s",
                directory,
                where,
                differing,
                identity["model"].get("name", identity["model"].get("path")),
            )
            return None
        return _decode(stored, (directory / TENSORS_FILE).read_bytes())
    except (OSError, ValueError, TypeError, KeyError) as error:
        logger.warning(
            "cannot read base facts in %s (%s): %s; deriving them again from the base model",
            directory,
            where,
            error,
        )
        return None


def _decode(stored: dict[str, Any], tensors: bytes) -> BaseFacts:
    if hashlib.sha256(tensors).hexdigest() != stored["initial_sha256"]:
        raise ValueError(f"{TENSORS_FILE} does not match its sha256 in {FACTS_FILE}")
    initial = dict(sorted(load_safetensors(tensors).items()))
    if not initial or any(t.dtype != torch.float32 for t in initial.values()):
        raise ValueError(f"{TENSORS_FILE} must hold float32 tensors")
    fingerprint, hidden_size = stored["fingerprint"], stored["hidden_size"]
    if not isinstance(fingerprint, str) or not (hidden_size is None or type(hidden_size) is int):
        raise ValueError(f"bad fingerprint or hidden_size in {FACTS_FILE}")
    peft_config = stored.get("peft_config")
    if not (peft_config is None or isinstance(peft_config, dict)):
        raise ValueError(f"bad peft_config in {FACTS_FILE}")
    return BaseFacts(initial, fingerprint, hidden_size, peft_config)


def write_facts(directory: Path, identity: dict[str, Any], facts: BaseFacts) -> None:
    """Keep ``facts`` in ``directory``: the tensors first, then the JSON that vouches for them."""
    tensors = encode_adapter(facts.initial)
    atomic_write(directory / TENSORS_FILE, tensors)
    stored = {
        "identity": identity,
        "fingerprint": facts.fingerprint,
        "hidden_size": facts.hidden_size,
        "peft_config": facts.peft_config,
        "initial_sha256": hashlib.sha256(tensors).hexdigest(),
    }
    atomic_write(directory / FACTS_FILE, (json.dumps(stored, indent=1) + "\n").encode())


@dataclass(frozen=True)
class Recalled:
    """Base facts and where they came from; ``keep()`` stores them in the state dir."""

    facts: BaseFacts
    identity: dict[str, Any]
    state_dir_facts: Path
    from_state_dir: bool

    def keep(self) -> None:
        """Write the facts into the state dir (once it has accepted them); a failure is
        only logged: the next start derives them again."""
        if self.from_state_dir:
            return
        try:
            write_facts(self.state_dir_facts, self.identity, self.facts)
        except OSError as error:
            logger.warning("cannot keep base facts in %s: %s", self.state_dir_facts, error)


def recall_base_facts(
    settings: CoordinatorSettings, derive: Callable[[CoordinatorSettings], BaseFacts]
) -> Recalled:
    """The base facts from the state dir, else the shared cache, else ``derive`` (which
    loads the model; its result is then cached when the identity allows)."""
    identity = facts_identity(settings)
    kept = settings.state_dir / STATE_DIR_FACTS
    facts = read_facts(kept, identity, "state dir")
    if facts is not None:
        logger.info("base facts of %s from the state dir %s", settings.base_model, kept)
        return Recalled(facts, identity, kept, from_state_dir=True)
    entry = cache_entry(settings.cache_dir, identity)
    facts = read_facts(entry, identity, "cache") if entry else None
    if facts is not None:
        logger.info("base facts of %s from the cache %s", settings.base_model, entry)
        return Recalled(facts, identity, kept, from_state_dir=False)
    facts = derive(settings)
    if entry is not None:
        try:
            write_facts(entry, identity, facts)
        except OSError as error:  # a read-only home must not stop the coordinator
            logger.warning("cannot write the base facts cache %s: %s", entry, error)
    return Recalled(facts, identity, kept, from_state_dir=False)
