"""Bearer tokens: who a token is (admin, or a worker bound to one worker id).

Tokens come from the shared ``auth_token`` (admin) and/or a JSON tokens file::

    {"tokens": [{"token": "…", "role": "worker", "worker_id": "Worker-1-Python",
                 "experts": ["python_expert"]},
                {"sha256": "<hex digest of a token>", "role": "admin"}]}

A worker entry's optional ``experts`` lists the experts that worker may register for and
train; without it, any one expert (moving to another one needs an admin token).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("admin", "worker")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    role: str
    worker_id: str | None = None
    experts: tuple[str, ...] | None = None

    def may_act_as(self, worker_id: str) -> bool:
        """Admins act as anyone; a worker token only as its own worker id."""
        return self.role == "admin" or self.worker_id == worker_id

    def may_train(self, expert: str) -> bool:
        """Whether this caller may register for (and upload to) ``expert``."""
        return self.role == "admin" or self.experts is None or expert in self.experts

    @property
    def is_admin(self) -> bool:
        """Whether this is an admin token (or auth is off)."""
        return self.role == "admin"


class TokenRegistry:
    """Maps token digests to principals; compares in constant time."""

    def __init__(self, entries: dict[str, Principal]) -> None:
        self._entries = entries

    @property
    def enabled(self) -> bool:
        """False when no token is configured (loopback development)."""
        return bool(self._entries)

    @classmethod
    def from_sources(cls, shared_token: str | None, tokens_file: Path | None) -> TokenRegistry:
        """Build the registry from a shared admin token and/or a tokens file."""
        entries: dict[str, Principal] = {}
        if shared_token:
            entries[_digest(shared_token)] = Principal(role="admin")
        if tokens_file:
            entries.update(_read_tokens_file(Path(tokens_file)))
        return cls(entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal of ``token``, or None if it is unknown."""
        digest = _digest(token)
        found = None
        for known, principal in self._entries.items():
            if hmac.compare_digest(known, digest):
                found = principal
        return found


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _read_tokens_file(path: Path) -> dict[str, Principal]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read tokens file {path}: {error}") from None
    items = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError(f'{path}: expected {{"tokens": [...]}}')
    entries = {}
    for index, item in enumerate(items):
        entries[_entry_digest(path, index, item)] = _entry_principal(path, index, item)
    return entries


def _entry_digest(path: Path, index: int, item: object) -> str:
    if not isinstance(item, dict):
        raise ValueError(f"{path}: tokens[{index}] is not an object")
    if isinstance(item.get("token"), str) and len(item["token"]) >= 16:
        return _digest(item["token"])
    if isinstance(item.get("sha256"), str) and len(item["sha256"]) == 64:
        return str(item["sha256"]).lower()
    raise ValueError(f"{path}: tokens[{index}] needs a 'token' of 16+ characters or a 'sha256'")


def _entry_principal(path: Path, index: int, item: dict[str, Any]) -> Principal:
    role = item.get("role", "worker")
    if role not in ROLES:
        raise ValueError(f"{path}: tokens[{index}].role must be one of {ROLES}, got {role!r}")
    worker_id = item.get("worker_id")
    if role == "worker" and not isinstance(worker_id, str):
        raise ValueError(f"{path}: tokens[{index}] has role worker but no worker_id")
    experts = item.get("experts")
    if experts is not None and (
        role != "worker"
        or not isinstance(experts, list)
        or not experts
        or not all(isinstance(name, str) and name for name in experts)
    ):
        raise ValueError(
            f"{path}: tokens[{index}].experts must be a non-empty list of expert names "
            "on a worker entry"
        )
    if role != "worker":
        return Principal(role=role)
    return Principal(role=role, worker_id=worker_id, experts=tuple(experts) if experts else None)
