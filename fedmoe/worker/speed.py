"""The training loop's speed switches: per-device-kind defaults and applying them to a model.

Every switch of ``TrainSettings`` (``packing``, ``cross_entropy``,
``gradient_checkpointing``, ``torch_compile``) is ``auto`` by default and then takes the
value measured best on that device kind (``benchmarks/worker_speed_bench.py``; the CPU
defaults come from its CPU run, the CUDA ones are provisional until
``benchmarks/gpu_speed.sh`` has been run on a GPU). Each switch keeps the loss and the
gradients of the plain loop within float tolerance (``tests/test_speed_switches.py``).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, replace
from typing import Literal

import torch
from peft import PeftModel

from fedmoe.config import TrainSettings

logger = logging.getLogger(__name__)

LossKind = Literal["full", "chunked", "liger"]


class SpeedSetupError(RuntimeError):
    """A speed or memory option cannot work here (a missing package or device)."""


@dataclass(frozen=True)
class SpeedPlan:
    """The resolved switches of one trainer."""

    packing: bool = False
    cross_entropy: LossKind = "full"
    gradient_checkpointing: bool = False
    torch_compile: bool = False


#: Measured defaults per device kind (``type`` of the torch device); others use ``cpu``'s.
#: cpu: benchmarks/RESULTS.md "Worker speed" (tiny preset, 2 shared cores): packing ran at
#: 0.42-0.52x (one long row: SDPA's dense block-diagonal mask costs O(row²)); the chunked
#: loss ran at 1.11-1.13x the plain loop against 1.01-1.17x for full logits in two runs,
#: within this machine's noise over a 259-token vocabulary: full logits stay the default.
#: cuda: not measured here (no GPU in the session that wrote this): the chunked loss, as
#: the issue's H100 figures suggest (it never materialises batch × length × 152k logits),
#: until benchmarks/gpu_speed.sh has run.
DEVICE_DEFAULTS: dict[str, SpeedPlan] = {
    "cpu": SpeedPlan(),
    "cuda": SpeedPlan(cross_entropy="chunked"),
}

#: Attention implementations with a variable-length kernel: packing pays only with these
#: (they skip the attention between examples instead of masking a dense row × row matrix).
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def liger_available() -> bool:
    """Liger Kernel is installed (``pip install 'fedmoe[speed]'``)."""
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_plan(
    settings: TrainSettings, device: torch.device, attention: str | None = None
) -> SpeedPlan:
    """The switches to use: each explicit setting, else the device kind's default (packing:
    on when the model's ``attention`` implementation has a variable-length kernel)."""
    default = DEVICE_DEFAULTS.get(device.type, DEVICE_DEFAULTS["cpu"])
    if attention in VARLEN_ATTENTION:
        default = replace(default, packing=True)
    cross_entropy = settings.cross_entropy
    if cross_entropy == "auto":
        use_liger = device.type == "cuda" and liger_available()
        cross_entropy = "liger" if use_liger else default.cross_entropy
    if cross_entropy == "liger" and not liger_available():
        raise SpeedSetupError(
            "--cross-entropy liger needs Liger Kernel: pip install 'fedmoe[speed]' "
            "(or liger-kernel); 'chunked' is the built-in alternative"
        )

    def switch(value: str, fallback: bool) -> bool:
        return fallback if value == "auto" else value == "on"

    return SpeedPlan(
        packing=switch(settings.packing, default.packing),
        cross_entropy=cross_entropy,
        gradient_checkpointing=switch(
            settings.gradient_checkpointing, default.gradient_checkpointing
        ),
        torch_compile=switch(settings.torch_compile, default.torch_compile),
    )


def apply_model_switches(
    model: PeftModel, plan: SpeedPlan, *, compile_backend: str = "inductor"
) -> None:
    """Turn on gradient checkpointing and per-layer ``torch.compile`` as the plan says."""
    base = model.get_base_model()
    if plan.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the base is
        # frozen under LoRA) and works under DDP.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    if plan.torch_compile:
        layers = getattr(base.get_decoder(), "layers", None)
        if layers is None:
            raise SpeedSetupError("--torch-compile on needs a decoder with .layers (Qwen2-like)")
        for layer in layers:  # per layer: small graphs, compiled once and reused 24x
            layer.compile(backend=compile_backend, dynamic=True)
        logger.info("compiled %d decoder layers (%s)", len(layers), compile_backend)
