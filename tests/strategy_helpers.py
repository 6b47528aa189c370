"""Shared pieces of the server-strategy unit tests: a two-element expert and updates to it."""

from __future__ import annotations

import torch

from fedmoe.server_strategy import Contribution

THETA = {"w": torch.tensor([1.0, 2.0])}


def update(
    delta: list[float],
    *,
    uid: str = "u",
    decay: float = 1.0,
    tokens: float = 1.0,
    now: float = 0.0,
    workers: int = 2,
    worker: str = "",
) -> Contribution:
    """A contribution of ``delta`` to ``w`` (clip 1) while ``workers`` are active."""
    return Contribution(
        update_id=uid,
        delta={"w": torch.tensor(delta)},
        decay=decay,
        clip=1.0,
        token_factor=tokens,
        active_workers=workers,
        now=now,
        worker_id=worker,
    )
