"""Comparing base-model fingerprints (``config:<hash>/weights:<hash>``) as plain strings.

``fedmoe.modeling`` computes fingerprints; the coordinator only compares them, so it
does not need transformers or peft for that.
"""

from __future__ import annotations


def fingerprint_differences(ours: str, theirs: str) -> list[str]:
    """Which parts (config, weights) of two fingerprints differ."""
    mine, other = _parts(ours), _parts(theirs)
    if set(mine) != set(other):
        return [f"fingerprint format differs: {ours!r} vs {theirs!r}"]
    return [f"base model {part} differs" for part in mine if mine[part] != other[part]]


def _parts(fingerprint: str) -> dict[str, str]:
    pairs = (piece.split(":", 1) for piece in fingerprint.split("/") if ":" in piece)
    return {name: value for name, value in pairs}
