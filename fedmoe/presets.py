"""Base model names without transformers: the built-in presets, and local paths.

``fedmoe.tiny`` builds the preset (it needs transformers); the coordinator only needs
to recognise the name, know which build of the preset it kept facts about, and refuse a
missing model directory before it imports anything heavy.
"""

from __future__ import annotations

from pathlib import Path

TINY_NAME = "tiny"
# Bump whenever fedmoe.tiny builds different weights, config or tokenizer: kept base
# facts (fedmoe.coordinator.base_facts) of the old build are then derived again.
TINY_VERSION = 1


def check_local_name(name: str) -> None:
    """FileNotFoundError when ``name`` can only be a local directory and there is none.

    An HF id is "name" or "org/name"; a name starting with ".", "~" or "/", or with more
    than one "/", can only be a path.
    """
    if name == TINY_NAME or Path(name).expanduser().exists():
        return
    if name.startswith((".", "~", "/")) or name.count("/") > 1:
        raise FileNotFoundError(f"base model {name!r}: no such directory (nor the preset 'tiny')")
