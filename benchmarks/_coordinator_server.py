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

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from fastapi import Request

from fedmoe.config import LoraSettings

QWEN_HIDDEN, QWEN_LAYERS, QWEN_KV_OUT, QWEN_INTERMEDIATE = 896, 24, 2 * 64, 4864
QWEN_RANK = 16
QWEN_NAME = "synthetic/Qwen2.5-0.5B-shape"
QWEN_FINGERPRINT = "config:synthetic0qwen05/weights:synthetic0qwen05"
# Qwen2.5-7B: hidden, layers, k/v out (4 heads x 128), intermediate
QWEN7_DIMS = (3584, 28, 4 * 128, 18944)
QWEN7_NAME = "synthetic/Qwen2.5-7B-shape"
DIMS = {
    QWEN_NAME: (QWEN_HIDDEN, QWEN_LAYERS, QWEN_KV_OUT, QWEN_INTERMEDIATE),
    QWEN7_NAME: QWEN7_DIMS,
}
BASE_OF_SHAPE = {"qwen": QWEN_NAME, "qwen7": QWEN7_NAME}


def qwen_shapes(rank: int = QWEN_RANK, base: str = QWEN_NAME) -> dict[str, tuple[int, int]]:
    """PEFT keys and shapes of a rank-``rank`` LoRA on every projection of Qwen2.5-0.5B
    (or of ``base``'s dimensions: ``QWEN7_NAME``)."""
    h, layers, kv, inter = DIMS[base]
    # module -> (in_features, out_features)
    modules = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (h, inter),
        "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }
    shapes = {}
    for layer in range(layers):
        for module, (fan_in, fan_out) in modules.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{prefix}.lora_B.weight"] = (fan_out, rank)
    return dict(sorted(shapes.items()))


def qwen_initial(
    rank: int = QWEN_RANK, seed: int = 0, base: str = QWEN_NAME
) -> dict[str, torch.Tensor]:
    """A PEFT-like initial adapter: small random A, zero B (float32)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in qwen_shapes(rank, base).items():
        if ".lora_A." in key:
            state[key] = torch.randn(shape, generator=generator) * 0.02
        else:
            state[key] = torch.zeros(shape)
    return state


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


def floor_app(directory: Path):
    """The FLOOR: FastAPI reads the body and (optionally) writes it durably, nothing else."""
    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool

    from fedmoe.adapters import atomic_write

    app = FastAPI()
    directory.mkdir(parents=True, exist_ok=True)
    counter = {"n": 0}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

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
    import uvicorn

    from fedmoe.api.app import create_app
    from fedmoe.api.server import listen_socket, write_url_file
    from fedmoe.coordinator.auth import TokenRegistry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--url-file", type=Path, required=True)
    parser.add_argument("--shape", choices=("tiny", "qwen", "qwen7"), default="tiny")
    parser.add_argument("--experts", default="e0,e1,e2")
    parser.add_argument("--merge-method", default="cat")
    parser.add_argument("--floor", action="store_true")
    args = parser.parse_args()
    coordinator = None
    if args.floor:
        app = floor_app(args.state_dir)
    else:
        coordinator = build_coordinator(
            args.shape, args.state_dir, args.experts.split(","), args.merge_method
        )
        app = create_app(coordinator, TokenRegistry({}))
    sock = listen_socket("127.0.0.1", 0)  # the real server's own listener
    write_url_file(args.url_file, f"http://127.0.0.1:{sock.getsockname()[1]}")
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=10)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if coordinator is not None:
            coordinator.close()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
