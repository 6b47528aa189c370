"""The digest kept with every upload's body: BLAKE3 (``b3sum``'s), as ``body_blake3``.

An accepted update's ledger row and its write-ahead log record keep a digest of the bytes
it came with: recovery tells a whole record from a torn tail by it, and a retried update
id that brings other bytes is refused by it. It is BLAKE3 (the ``blake3`` package, the
bindings of the reference Rust crate), which a user checks with ``b3sum``. It was SHA-256
(``body_sha256``) before: on the coordinator's two cores SHA-256 took 13 ms of CPU for a
17.6 MB body, BLAKE3 3.3 ms (issue 13: acknowledgement latency). Rows and records written
before keep their SHA-256 and are still checked against it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from blake3 import blake3

from fedmoe.adapters import Buffer

KEY = "body_blake3"
LEGACY_KEY = "body_sha256"  # rows and records written before BLAKE3


def new_hasher() -> blake3:
    """An incremental BLAKE3 hasher (``update`` releases the GIL on large inputs)."""
    return blake3()


def body_digest(body: Buffer) -> str:
    """The hex BLAKE3 digest of ``body``."""
    return blake3(body).hexdigest()


def matches(kept: Mapping[str, Any], body: Buffer, digest: str | None = None) -> bool:
    """Whether ``body`` is the body whose digest ``kept`` (a log header or a ledger row's
    fields) holds; True when it holds none. ``digest``: ``body_digest(body)``, if known."""
    if kept.get(KEY) is not None:
        return bool((digest if digest is not None else body_digest(body)) == kept[KEY])
    if kept.get(LEGACY_KEY) is not None:
        return bool(hashlib.sha256(body).hexdigest() == kept[LEGACY_KEY])
    return True
