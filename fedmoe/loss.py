"""The next-token loss and precision policy shared by training and evaluation.

Below both ``fedmoe.worker`` and ``fedmoe.evaluation``, so that measuring a model never
depends on the worker package.
"""

from __future__ import annotations

import contextlib

import torch

from fedmoe.batching import IGNORE_INDEX


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross entropy; ``IGNORE_INDEX`` labels carry no loss.

    The labels are shifted left (the last position gets ``IGNORE_INDEX``) instead of
    slicing the logits, so the logits (batch × length × vocabulary) are never copied.
    """
    shifted_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bfloat16 autocast on CUDA devices that support it; otherwise nothing."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
