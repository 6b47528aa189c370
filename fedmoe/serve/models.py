"""The served models: one base model with every expert (and the gateway) as a named adapter.

Only the engine thread changes the peft model (``install`` and ``install_dir`` run via
``Engine.call``); request handlers read ``cards()``, an immutable snapshot replaced
whole after every change.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import set_peft_model_state_dict
from safetensors import safe_open

from fedmoe.adapters import ADAPTER_FILE
from fedmoe.modeling import BaseModel
from fedmoe.serve.settings import GATEWAY_MODEL

logger = logging.getLogger(__name__)
MIX_PREFIX = "mix-"
MIX_PERCENT_STEP = 5  # mix weights are rounded to 5% so that similar requests share a mix
MAX_MIXES = 8


@dataclass(frozen=True)
class AdapterEntry:
    """What is loaded under one adapter name."""

    name: str
    kind: str  # "expert" or "gateway"
    version: int
    rank: int
    etag: str = ""
    created: int = 0


class ModelRegistry:
    """The base model wrapped by peft, and the adapters loaded into it."""

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.model: PeftModel | None = None
        self._entries: dict[str, AdapterEntry] = {}
        self._mixes: dict[str, AdapterEntry] = {}  # insertion order = age

    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer."""
        return self.base.tokenizer

    def entries(self) -> Mapping[str, AdapterEntry]:
        """A snapshot of the loaded adapters (safe to read from any thread)."""
        return self._entries

    def entry(self, name: str) -> AdapterEntry:
        """A loaded adapter or router mix by name (KeyError if neither)."""
        return self._entries[name] if name in self._entries else self._mixes[name]

    def require_model(self) -> PeftModel:
        """The peft model; RuntimeError when no adapter was loaded yet."""
        if self.model is None:
            raise RuntimeError("no adapter is loaded")
        return self.model

    def install(
        self,
        name: str,
        config: LoraConfig,
        state: Mapping[str, torch.Tensor],
        *,
        version: int,
        etag: str = "",
    ) -> AdapterEntry:
        """Load (or replace) adapter ``name`` from PEFT-keyed tensors. Engine thread only."""
        self._prepare_slot(name, config)
        model = self.require_model()
        result: Any = set_peft_model_state_dict(model, dict(state), adapter_name=name)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"adapter {name}: {len(missing)} LoRA tensors missing (e.g. {missing[:2]}), "
                f"unexpected {list(result.unexpected_keys)[:2]}"
            )
        self._drop_mixes_of(name)
        return self._record(name, config, version, etag)

    def ensure_mix(self, weights: Mapping[str, float]) -> str:
        """An adapter computing Σ w·B·A·scaling over loaded experts (peft ``cat``). Engine thread.

        Weights are rounded to ``MIX_PERCENT_STEP`` percent; the few most recent mixes are
        kept, and a mix is dropped when one of its experts gets a new version.
        """
        percents = {
            n: round(w * 100 / MIX_PERCENT_STEP) * MIX_PERCENT_STEP for n, w in weights.items()
        }
        percents = {n: p for n, p in sorted(percents.items()) if p > 0}
        if not percents:
            raise ValueError("a mix needs at least one positive weight")
        name = MIX_PREFIX + "-".join(f"{n}-{p}" for n, p in percents.items())
        if name in self._mixes:
            return name
        model = self.require_model()
        if len(self._mixes) >= MAX_MIXES:
            self._delete_mix(next(iter(self._mixes)))
        total = sum(percents.values())
        model.add_weighted_adapter(
            list(percents), [p / total for p in percents.values()], name, combination_type="cat"
        )
        model.eval()
        rank = int(getattr(model.peft_config[name], "r", 0))
        version = sum(self._entries[n].version for n in percents)
        self._mixes[name] = AdapterEntry(name, "mix", version, rank, "", int(time.time()))
        return name

    def _drop_mixes_of(self, expert: str) -> None:
        for name in [m for m in self._mixes if f"-{expert}-" in f"{m}-"]:
            self._delete_mix(name)

    def _delete_mix(self, name: str) -> None:
        self.require_model().delete_adapter(name)
        del self._mixes[name]

    def install_dir(self, name: str, directory: Path) -> AdapterEntry:
        """Load adapter ``name`` from a PEFT adapter directory. Engine thread only."""
        config = LoraConfig.from_pretrained(str(directory))
        if self.model is None:
            self.model = PeftModel.from_pretrained(
                self.base.model, str(directory), adapter_name=name
            ).eval()
        else:
            if name in self.model.peft_config:
                self.model.delete_adapter(name)
            self.model.load_adapter(str(directory), adapter_name=name)
        return self._record(name, config, _dir_version(directory), etag="")

    def _prepare_slot(self, name: str, config: LoraConfig) -> None:
        """Make sure adapter ``name`` exists with ``config``'s shape (re-created if it differs)."""
        if self.model is None:
            self.model = get_peft_model(self.base.model, config, adapter_name=name).eval()
            return
        current: Any = self.model.peft_config.get(name)
        if current is not None and (current.r, current.lora_alpha) == (
            config.r,
            config.lora_alpha,
        ):
            return
        if current is not None:
            self.model.delete_adapter(name)
        self.model.add_adapter(name, config)
        self.model.eval()

    def _record(self, name: str, config: LoraConfig, version: int, etag: str) -> AdapterEntry:
        kind = "gateway" if name == GATEWAY_MODEL else "expert"
        entry = AdapterEntry(name, kind, version, int(config.r), etag, int(time.time()))
        self._entries = {**self._entries, name: entry}
        logger.info("loaded %s %s v%d (rank %d)", kind, name, version, config.r)
        return entry


def _dir_version(directory: Path) -> int:
    """The ``fedmoe_version`` our exports record in the safetensors metadata (0 if none)."""
    path = Path(directory) / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    try:
        return int(metadata.get("fedmoe_version", 0))
    except ValueError:
        return 0


def adapter_dirs(root: Path) -> dict[str, Path]:
    """Adapter directories under ``root``: every subdirectory with an adapter_config.json."""
    found = {
        path.parent.name: path.parent for path in sorted(Path(root).glob("*/adapter_config.json"))
    }
    if not found:
        raise FileNotFoundError(f"{root}: no PEFT adapter directories (*/adapter_config.json)")
    return found


def base_model_of(directory: Path) -> str:
    """The base model an adapter directory was written for."""
    config = json.loads((Path(directory) / "adapter_config.json").read_text())
    name = config.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{directory}: adapter_config.json names no base model")
    return str(name)
