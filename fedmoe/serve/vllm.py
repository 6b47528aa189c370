"""Export for vLLM: every expert (and the gateway) as a PEFT directory, the router, a command.

vLLM serves LoRA adapters up to ``--max-lora-rank``, which must be one of
``VLLM_RANKS``. An adapter whose rank is not in that set is zero-padded to the next one
(extra rows of A and columns of B are zero and alpha grows with the rank, so B·A·alpha/r
is unchanged). A ``cat`` gateway of K experts has rank K·r; over 512 it cannot be served
by vLLM and is left out (``--merge-method svd`` keeps it at rank r).
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedmoe.adapters import ADAPTER_FILE, write_peft_dir
from fedmoe.aggregate import LORA_A, LORA_B
from fedmoe.client import CoordinatorClient
from fedmoe.config import LoraSettings
from fedmoe.export import fetch_adapter_dir
from fedmoe.serve.router import ROUTER_FILE, fetch_signatures
from fedmoe.serve.settings import GATEWAY_MODEL
from fedmoe.tiny import TINY_NAME, export_tiny

logger = logging.getLogger(__name__)
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
MANIFEST = "vllm.json"


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``rank``; ValueError over 512."""
    for allowed in VLLM_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"rank {rank} is over vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")


def pad_rank(state: dict[str, torch.Tensor], rank: int, new_rank: int) -> dict[str, torch.Tensor]:
    """LoRA tensors at ``new_rank``: A gains zero rows, B zero columns (B·A unchanged)."""
    padded = {}
    for key, tensor in state.items():
        if LORA_A in key and tensor.shape[0] == rank:
            extra = torch.zeros((new_rank - rank, *tensor.shape[1:]), dtype=tensor.dtype)
            padded[key] = torch.cat([tensor, extra], dim=0)
        elif LORA_B in key and tensor.shape[1] == rank:
            extra = torch.zeros((tensor.shape[0], new_rank - rank), dtype=tensor.dtype)
            padded[key] = torch.cat([tensor, extra], dim=1)
        else:
            raise ValueError(f"{key}: not a rank-{rank} LoRA factor {tuple(tensor.shape)}")
    return padded


def export_for_vllm(
    client: CoordinatorClient, directory: Path, *, gateway: bool = True
) -> dict[str, Any]:
    """Write experts, gateway, router and the vLLM command line under ``directory``.

    Returns the manifest also written to ``directory/vllm.json``.
    """
    directory = Path(directory).resolve()  # the command line works from any directory
    directory.mkdir(parents=True, exist_ok=True)
    lora = LoraSettings.from_dict(client.schema().lora_config.model_dump())
    names = [item.name for item in client.experts()]
    adapters, skipped = {}, {}
    for name in [*names, *([GATEWAY_MODEL] if gateway else [])]:
        written = fetch_adapter_dir(
            client, directory / name, expert=None if name == GATEWAY_MODEL else name
        )
        try:
            adapters[name] = _fit_rank(written, lora, directory / name)
        except ValueError as error:  # a cat gateway over rank 512
            skipped[name] = str(error)
            _remove_dir(directory / name)
    base_model = str(written["base_model"])
    router = _write_router(client, directory)
    manifest = _manifest(directory, base_model, adapters, skipped, router)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (directory / "README.md").write_text(_readme(manifest))
    return manifest


def _fit_rank(written: dict[str, Any], lora: LoraSettings, path: Path) -> dict[str, Any]:
    """Pad the directory's adapter to a vLLM rank if needed; what it holds."""
    rank, alpha = int(written["rank"]), float(written["alpha"])
    target = vllm_rank(rank)
    if target != rank:
        state = pad_rank(load_file(str(path / ADAPTER_FILE)), rank, target)
        write_peft_dir(
            state,
            lora,
            path,
            base_model=str(written["base_model"]),
            rank=target,
            alpha=alpha * target / rank,
            metadata={
                "fedmoe_name": str(written["name"]),
                "fedmoe_version": str(written["version"]),
                "fedmoe_original_rank": str(rank),
            },
        )
    return {
        "version": written["version"],
        "rank": target,
        "original_rank": rank,
        "alpha": alpha * target / rank,
        "path": str(path),
    }


def _write_router(client: CoordinatorClient, directory: Path) -> str | None:
    """Write ``router.json`` (signatures, featurizer, decision settings) if there are any."""
    from fedmoe.signature import DomainSignature

    payload = fetch_signatures(client)
    if not payload or not payload.get("signatures"):
        return None
    (directory / ROUTER_FILE).write_text(json.dumps(payload) + "\n")
    signature_dir = directory / "signatures"
    signature_dir.mkdir(exist_ok=True)
    for name, data in payload["signatures"].items():
        signature = DomainSignature.from_dict(dict(data))
        (signature_dir / f"{name}.safetensors").write_bytes(signature.to_safetensors())
    return ROUTER_FILE


def _manifest(
    directory: Path,
    base_model: str,
    adapters: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    router: str | None,
) -> dict[str, Any]:
    model_path = base_model
    if base_model == TINY_NAME:  # vLLM needs a model directory; the preset is written out
        model_path = str(export_tiny(directory / "base_model"))
    max_rank = max((a["rank"] for a in adapters.values()), default=VLLM_RANKS[0])
    modules = [f"{name}={info['path']}" for name, info in adapters.items()]
    command = [
        "vllm",
        "serve",
        model_path,
        "--enable-lora",
        "--max-lora-rank",
        str(max_rank),
        "--max-loras",
        str(len(adapters)),
        "--lora-modules",
        *modules,
    ]
    return {
        "base_model": base_model,
        "model_path": model_path,
        "max_lora_rank": max_rank,
        "max_loras": len(adapters),
        "adapters": adapters,
        "skipped": skipped,
        "lora_modules": " ".join(shlex.quote(m) for m in modules),
        "command": shlex.join(command),
        "router": router,
    }


def _readme(manifest: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {name} | {info['version']} | {info['original_rank']} | {info['rank']} |"
        for name, info in manifest["adapters"].items()
    )
    skipped = "".join(f"\n- `{name}` left out: {why}" for name, why in manifest["skipped"].items())
    router = (
        f"`{manifest['router']}` holds the router (signatures, featurizer, decision settings; "
        "`signatures/*.safetensors` the same per expert): `fedmoe.routing.router_from_payload"
        "(json.load(...))` picks the `model` of each request."
        if manifest["router"]
        else "The coordinator had no domain signatures, so no router was written."
    )
    return f"""# FedMoE experts for vLLM

```bash
{manifest["command"]}
```

`--lora-modules` {manifest["lora_modules"]}

| adapter | version | rank | served at rank |
|---|---|---|---|
{rows}
{skipped}

vLLM's `--max-lora-rank` must be one of {", ".join(map(str, VLLM_RANKS))}; adapters of
another rank were zero-padded to the next one (exactly the same B·A). A `cat` gateway of K
experts of rank r has rank K·r and needs `--max-lora-rank` ≥ K·r (over 512: merge with
`svd`). {router} The same directory serves offline with
`fedmoe serve --adapters-dir <this directory>`.
"""


def _remove_dir(path: Path) -> None:
    for child in sorted(path.glob("*")):
        child.unlink()
    path.rmdir()
