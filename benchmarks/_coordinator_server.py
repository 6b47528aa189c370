"""A benchmark server process: a real coordinator (or the FLOOR app) under uvicorn.

Run as ``python -m benchmarks._coordinator_server --state-dir D --shape tiny|qwen
--experts e0,e1,e2 --url-file F`` (or ``--floor``). It binds 127.0.0.1 port 0 itself,
writes ``{"url", "pid"}`` to F (``fedmoe.procs.start_server`` waits for it), and serves
until SIGTERM. uvicorn runs exactly as
``fedmoe.api.server.serve`` runs it (log level ``info``, access log on).

Shapes:

* ``tiny``: the real path, ``open_coordinator`` with the tiny preset (rank 8).
* ``qwen``: a ``CentralCoordinator`` built from a synthetic adapter shaped like
  Qwen2.5-0.5B's with LoRA r=16 on q,k,v,o,gate,up,down (no model is loaded).

The FLOOR app answers ``POST /floor/{name}`` by reading the body and, unless
``?write=0``, writing it to disk with temp file + fsync + rename + directory
fsync (``fedmoe.adapters.atomic_write``, the coordinator's own writer).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fastapi import Request

from benchmarks._realsize_server import RANK, SHAPES, initial_adapter
from benchmarks._serve import floor_base, serve, server_parser
from fedmoe.config import LoraSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

QWEN_RANK = RANK
QWEN_NAME = "synthetic/Qwen2.5-0.5B-shape"
QWEN_FINGERPRINT = "config:synthetic0qwen05/weights:synthetic0qwen05"
QWEN7_NAME = "synthetic/Qwen2.5-7B-shape"
SIZE_OF_BASE = {QWEN_NAME: "0.5B", QWEN7_NAME: "7B"}
BASE_OF_SHAPE = {"qwen": QWEN_NAME, "qwen7": QWEN7_NAME}


def qwen_initial(
    rank: int = QWEN_RANK, seed: int = 0, base: str = QWEN_NAME
) -> dict[str, torch.Tensor]:
    """A PEFT-like initial adapter of Qwen2.5-0.5B's shape (or ``base``'s:
    ``QWEN7_NAME``): small random A, zero B (float32)."""
    return initial_adapter(SHAPES[SIZE_OF_BASE[base]], rank, seed)


def random_delta(schema: dict[str, tuple[int, ...]], seed: int = 1) -> dict[str, torch.Tensor]:
    """A random delta matching ``schema`` (float32, small values)."""
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) * 1e-3 for key, shape in schema.items()}


def qwen_source(settings: Any) -> Any:
    """``InitialSource`` of the synthetic Qwen-shaped model: no model is loaded."""
    from fedmoe.coordinator.bootstrap import BaseFacts

    lora: LoraSettings = settings.lora
    initial = qwen_initial(lora.rank, lora.seed, settings.base_model)
    return BaseFacts(initial, QWEN_FINGERPRINT, hidden_size=None)


def build_coordinator(
    shape: str, state_dir: Path, experts: list[str], merge_method: str = "cat", **settings: Any
) -> Any:
    """A coordinator of ``shape`` opened by the product's ``open_coordinator``.

    ``tiny`` loads the real preset; ``qwen`` passes a synthetic initial adapter (the same
    lock, ledger, store and restore as ``fedmoe coordinator``).
    """
    from fedmoe.coordinator.bootstrap import base_model_initial, open_coordinator
    from fedmoe.coordinator.settings import CoordinatorSettings

    if shape == "tiny":
        config = CoordinatorSettings(
            state_dir=state_dir,
            experts=experts,
            base_model="tiny",
            merge_method=merge_method,
            **settings,
        )
        return open_coordinator(config, base_model_initial)
    config = CoordinatorSettings(
        state_dir=state_dir,
        experts=experts,
        base_model=BASE_OF_SHAPE[shape],
        lora_rank=QWEN_RANK,
        lora_alpha=2.0 * QWEN_RANK,
        merge_method=merge_method,
        **settings,
    )
    return open_coordinator(config, qwen_source)


def floor_app(directory: Path) -> FastAPI:
    """The FLOOR: FastAPI reads the body and (optionally) writes it durably, nothing else."""
    from starlette.concurrency import run_in_threadpool

    from fedmoe.adapters import atomic_write

    app = floor_base()
    directory.mkdir(parents=True, exist_ok=True)
    counter = {"n": 0}

    @app.post("/floor/{name}")
    async def floor(name: str, request: Request, write: int = 1) -> dict[str, int]:
        body = await request.body()
        counter["n"] += 1
        if write:
            await run_in_threadpool(atomic_write, directory / f"{name}.bin", body)
        return {"version": counter["n"], "bytes": len(body)}

    return app


def main() -> None:
    """Parse flags, build the app, bind port 0, print it and serve until SIGTERM."""
    parser = server_parser(__doc__.splitlines()[0], experts="e0,e1,e2")
    parser.add_argument("--shape", choices=("tiny", "qwen", "qwen7"), default="tiny")
    parser.add_argument("--merge-method", default="cat")
    args = parser.parse_args()
    if args.floor:
        serve(args.url_file, floor_app(args.state_dir), None)
    else:
        experts = args.experts.split(",")
        coordinator = build_coordinator(args.shape, args.state_dir, experts, args.merge_method)
        serve(args.url_file, None, coordinator)


if __name__ == "__main__":
    main()
