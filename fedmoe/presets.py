"""Names of the built-in base model presets, importable without transformers.

``fedmoe.tiny`` builds the preset (it needs transformers); the coordinator only needs
to recognise the name and know which build of the preset it kept facts about.
"""

from __future__ import annotations

TINY_NAME = "tiny"
# Bump whenever fedmoe.tiny builds different weights, config or tokenizer: kept base
# facts (fedmoe.coordinator.base_facts) of the old build are then derived again.
TINY_VERSION = 1
