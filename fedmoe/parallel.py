"""Per-tensor work on two threads: the caller's and one helper (torch kernels drop the GIL).

A coordinator acknowledging a big update converts, measures and applies a few hundred
tensors one after the other; splitting them in two halves by size halves that wall time
where a second core is free, with the same results tensor by tensor. Python threads that
block (rather than OpenMP workers that spin) also behave on a loaded machine, where
``torch.set_num_threads(2)`` can cost more than it gains. Small states stay on the
calling thread; work already running on the helper never waits for it (no deadlock).
A process whose tensor work goes through here (the coordinator) runs torch's kernels on
one thread each (``one_thread_per_kernel``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

MIN_ELEMENTS = 1 << 20  # below about 4 MB of float32 a thread hop is not worth it
_HELPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmoe-tensor-helper")
_on_helper = threading.local()


def one_thread_per_kernel() -> None:
    """Let each torch kernel run on the thread that calls it (no intra-op thread team).

    ``per_tensor`` already keeps two cores busy; kernels that also split their work over
    an OpenMP team put four busy threads on two cores. Measured on the coordinator's
    acknowledgement of a 17.6 MB update (two cores, alternating runs): the work after the
    last byte took 67-70 ms with one thread per kernel against 75-79 ms with two.
    """
    torch.set_num_threads(1)


def per_tensor(fn: Callable[[str], T], keys: Sequence[str], numels: Sequence[int]) -> dict[str, T]:
    """``{key: fn(key)}`` in ``keys`` order, the second half (by ``numels``) on the helper."""
    total = sum(numels)
    if total < MIN_ELEMENTS or getattr(_on_helper, "active", False):
        return {key: fn(key) for key in keys}
    cut, running = len(keys), 0
    for index, count in enumerate(numels):
        running += count
        if 2 * running >= total:
            cut = index + 1
            break
    later = _HELPER.submit(_run_on_helper, fn, keys[cut:])
    first = {key: fn(key) for key in keys[:cut]}
    return first | later.result()


def _run_on_helper(fn: Callable[[str], T], keys: Sequence[str]) -> dict[str, T]:
    _on_helper.active = True
    try:
        return {key: fn(key) for key in keys}
    finally:
        _on_helper.active = False
