"""The gateway merged on request at real sizes (part of ``benchmarks.realsize_bench``).

A coordinator builds the merged gateway only when someone downloads it (or with
``--eager-gateway``), so its merge time is what a user waits for on top of the download.
This times ``GatewayMerge.merge`` (the product's code) for every merge method over three
experts of each size (random factors of the LoRA shapes, float32, in this process), and
compares the ``svd`` merge on layer 0's seven pairs with the textbook way of computing it:
the SVD of each full out×in product Σ_k w_k·B_k·A_k (``product_svd``). Both give the best
rank-r fit; the check is that their products agree.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks._realsize_server import RANK, SHAPES, lora_shapes
from fedmoe.aggregate import AdapterState, lora_pairs, merge_svd
from fedmoe.config import LoraSettings
from fedmoe.strategy import MERGE_METHODS, GatewayMerge

EXPERTS = 3


def expert_states(size: str, count: int = EXPERTS) -> list[AdapterState]:
    """``count`` random float32 adapters of ``size``'s LoRA shapes (both factors non-zero,
    as after training)."""
    generator = torch.Generator().manual_seed(0)
    shapes = lora_shapes(SHAPES[size])
    return [
        {key: 0.02 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}
        for _ in range(count)
    ]


def product_svd(states: list[AdapterState], weights: list[float], rank: int) -> AdapterState:
    """The svd merge computed from each full product (the reference)."""
    merged: AdapterState = {}
    for key_a, key_b in lora_pairs(states[0]):
        product = sum(w * (s[key_b].double() @ s[key_a].double()) for w, s in zip(weights, states))
        u, sigma, vh = torch.linalg.svd(product, full_matrices=False)
        root = sigma[:rank].sqrt()
        merged[key_b] = (u[:, :rank] * root).float()
        merged[key_a] = (root[:, None] * vh[:rank]).float()
    return merged


def _timed(function: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def _layer0(state: AdapterState) -> AdapterState:
    return {key: value for key, value in state.items() if ".layers.0." in key}


def merge_times(size: str, *, reference: bool) -> dict[str, Any]:
    """Seconds per merge method for ``EXPERTS`` experts of ``size``; with ``reference``,
    layer 0's svd merge both ways and the largest difference of their products."""
    states, weights = expert_states(size), [1.0 / EXPERTS] * EXPERTS
    lora = LoraSettings(rank=RANK, alpha=2.0 * RANK)
    seconds = {}
    for method in MERGE_METHODS:
        _, seconds[method] = _timed(GatewayMerge(method=method, lora=lora).merge, states, weights)
    row: dict[str, Any] = {
        "size": size,
        "model": SHAPES[size].name,
        "experts": EXPERTS,
        "seconds": seconds,
    }
    if reference:
        layer = [_layer0(state) for state in states]
        new, new_seconds = _timed(merge_svd, layer, weights, RANK)
        old, old_seconds = _timed(product_svd, layer, weights, RANK)
        row["layer0_svd"] = {
            "pairs": len(lora_pairs(layer[0])),
            "factored_seconds": new_seconds,
            "product_seconds": old_seconds,
            "max_abs_difference": _max_product_difference(new, old),
        }
    return row


def _max_product_difference(a: AdapterState, b: AdapterState) -> float:
    """The largest |B·A − B'·A'| over the pairs, relative to the largest |B'·A'|."""
    worst = 0.0
    for key_a, key_b in lora_pairs(a):
        left, right = a[key_b].double() @ a[key_a].double(), b[key_b].double() @ b[key_a].double()
        worst = max(worst, float((left - right).abs().max() / right.abs().max()))
    return worst
