"""Real-size servers for ``benchmarks.realsize_bench``: a coordinator whose experts have
the exact LoRA shapes of a Qwen2.5 model (no model loaded), and the FLOOR it is compared to.

Run as ``python -m benchmarks._realsize_server --size 7B --state-dir D --url-file F
[--experts e0,e1] [--floor] [--log-phases]`` (``--log-phases``: each update's phase
timings in the server's log, ``fedmoe.coordinator.phases``). It binds 127.0.0.1 port 0,
writes ``{"url", "pid"}`` to F (``fedmoe.procs.start_server`` waits for it) and serves
until SIGTERM.

The coordinator is the product's: ``open_coordinator`` (state-dir lock, ledger, store,
restore) with a synthetic ``InitialSource`` in place of loading the base model. The
initial adapter is PEFT's: small random A, zero B, under PEFT's key names, with LoRA r=16
on all seven projections; the shapes come from the published configs below. The FLOOR
(``--floor``) reads the body over the same HTTP stack and appends it to one file with a
single ``fsync``: the least any server that makes an upload durable must do.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from fastapi import Request

from benchmarks._serve import floor_base, serve, server_parser
from fedmoe.config import LoraSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fedmoe.coordinator.bootstrap import BaseFacts
    from fedmoe.coordinator.core import CentralCoordinator
    from fedmoe.coordinator.settings import CoordinatorSettings

RANK = 16


@dataclass(frozen=True)
class ModelShape:
    """What fixes a Qwen2 model's LoRA shapes (from its published ``config.json``)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int

    @property
    def kv_size(self) -> int:
        """Output features of k_proj and v_proj: key/value heads × head dimension."""
        return self.num_key_value_heads * (self.hidden_size // self.num_attention_heads)

    @property
    def fingerprint(self) -> str:
        """A fingerprint in the product's format that no real model has."""
        tag = "synthetic-" + self.name.lower().replace(".", "")
        return f"config:{tag}/weights:{tag}"


# The Hugging Face configs of Qwen/Qwen2.5-0.5B, -1.5B and -7B.
SHAPES = {
    "0.5B": ModelShape("Qwen2.5-0.5B", 896, 4864, 24, 14, 2),
    "1.5B": ModelShape("Qwen2.5-1.5B", 1536, 8960, 28, 12, 2),
    "7B": ModelShape("Qwen2.5-7B", 3584, 18944, 28, 28, 4),
}


def lora_shapes(model: ModelShape, rank: int = RANK) -> dict[str, tuple[int, int]]:
    """PEFT key → shape of a rank-``rank`` LoRA on q, k, v, o, gate, up and down_proj."""
    h, kv, inter = model.hidden_size, model.kv_size, model.intermediate_size
    modules = {  # module -> (in_features, out_features)
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (h, inter),
        "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }
    shapes = {}
    for layer in range(model.num_hidden_layers):
        for module, (fan_in, fan_out) in modules.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{prefix}.lora_B.weight"] = (fan_out, rank)
    return dict(sorted(shapes.items()))


def parameters(model: ModelShape, rank: int = RANK) -> int:
    """LoRA parameters of ``model`` at ``rank``."""
    return sum(rows * cols for rows, cols in lora_shapes(model, rank).values())


def initial_adapter(model: ModelShape, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """PEFT's initialisation: A small and random (seeded), B zero; float32."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=generator) * 0.02
        if ".lora_A." in key
        else torch.zeros(shape)
        for key, shape in lora_shapes(model, rank).items()
    }


def coordinator_settings(size: str, state_dir: Path, experts: list[str]) -> CoordinatorSettings:
    """The coordinator's settings: defaults but for the synthetic base model and r=16."""
    from fedmoe.coordinator.settings import CoordinatorSettings

    return CoordinatorSettings(
        state_dir=state_dir,
        experts=experts,
        base_model=f"synthetic/{SHAPES[size].name}-shape",
        lora=LoraSettings(rank=RANK, alpha=2.0 * RANK),
    )


def open_realsize(size: str, state_dir: Path, experts: list[str]) -> CentralCoordinator:
    """``open_coordinator`` with the synthetic base facts of ``size`` (no model loaded)."""
    from fedmoe.coordinator.bootstrap import BaseFacts, open_coordinator

    model = SHAPES[size]

    def source(settings: CoordinatorSettings) -> BaseFacts:
        lora: LoraSettings = settings.lora
        initial = initial_adapter(model, lora.rank, lora.seed)
        return BaseFacts(initial, model.fingerprint, hidden_size=model.hidden_size)

    return open_coordinator(coordinator_settings(size, state_dir, experts), source)


def floor_app(directory: Path) -> FastAPI:
    """FastAPI that reads the body and appends it to a file with one ``fsync``."""
    from starlette.concurrency import run_in_threadpool

    app = floor_base()
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "floor.log"

    def append(body: bytes) -> None:
        with open(log, "ab") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())

    @app.post("/floor")
    async def floor(request: Request) -> dict[str, int]:
        body = await request.body()
        await run_in_threadpool(append, body)
        return {"bytes": len(body)}

    return app


def main() -> None:
    """Parse flags, build the app, bind port 0, write the URL file and serve until SIGTERM."""
    parser = server_parser(__doc__.splitlines()[0], experts="e0")
    parser.add_argument("--size", choices=sorted(SHAPES), default="0.5B")
    parser.add_argument(
        "--log-phases", action="store_true", help="Log each update's phase timings (DEBUG)."
    )
    args = parser.parse_args()
    if args.log_phases:
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("fedmoe.coordinator.phases").setLevel(logging.DEBUG)
    if args.floor:
        serve(args.url_file, floor_app(args.state_dir), None)
    else:
        experts = args.experts.split(",")
        serve(args.url_file, None, open_realsize(args.size, args.state_dir, experts))


if __name__ == "__main__":
    main()
