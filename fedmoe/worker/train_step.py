"""One micro-batch's summed token loss: padded or packed inputs, full or chunked logits.

``CausalLMLoss`` is the module the trainer runs forward (DDP wraps it on several ranks):
it returns the *sum* of the next-token losses, so that the trainer can divide by the
target tokens of the whole (global) micro-batch and get the same gradient from one
process or from N.

Packing (padding-free): a micro-batch becomes one row, the examples back to back, with
``position_ids`` restarting at 0 for each example (``transformers``'
``DataCollatorWithFlattening``). Given ``position_ids`` and no attention mask, transformers
builds a block-diagonal causal mask from them (SDPA / eager; only with ``use_cache=False``)
or runs flash-attention's varlen kernel, so attention never crosses examples; the first
label of each example is ignored, so no example learns to predict the next one's start.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel
from torch.utils.checkpoint import checkpoint
from transformers import DataCollatorWithFlattening

from fedmoe.batching import IGNORE_INDEX, TokenizedExample, collate
from fedmoe.loss import causal_lm_loss
from fedmoe.worker.speed import LossKind

#: Target rows per chunk of logits in the chunked loss (× vocabulary × 4 bytes each).
CHUNK_TOKENS = 2048

_flatten = DataCollatorWithFlattening(return_tensors="pt", separator_id=IGNORE_INDEX)


def pack(batch: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
    """One row of every example back to back: ``input_ids``, ``labels``, ``position_ids``."""
    if not batch:
        raise ValueError("cannot pack an empty batch")
    features = [{"input_ids": item.input_ids, "labels": item.labels} for item in batch]
    packed = _flatten(features)
    return {key: packed[key] for key in ("input_ids", "labels", "position_ids")}


def make_batch(
    batch: Sequence[TokenizedExample], pad_token_id: int, *, packed: bool
) -> dict[str, torch.Tensor]:
    """The model inputs of a micro-batch: packed (one row) or right-padded."""
    return pack(batch) if packed else collate(batch, pad_token_id)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight).float()
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    shifted_labels: torch.Tensor,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """Summed cross entropy of ``head(hidden)`` over the target rows only, a chunk at a time.

    Only rows with a target are projected onto the vocabulary (prompt tokens cost no
    logits at all), and each chunk's logits are recomputed in backward instead of kept,
    so at most ``chunk_tokens`` × vocabulary logits exist at once.
    """
    weight = head.weight
    if getattr(head, "bias", None) is not None:
        raise ValueError("chunked cross entropy expects an output layer without bias")
    rows = hidden.reshape(-1, hidden.size(-1))
    labels = shifted_labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    rows, labels = rows[keep], labels[keep]
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.size(0), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        loss = checkpoint(_chunk_loss, rows[part], weight, labels[part], use_reentrant=False)
        total = total + loss
    return total


def _liger_loss(
    hidden: torch.Tensor, head: torch.nn.Module, shifted_labels: torch.Tensor
) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    rows = hidden.reshape(-1, hidden.size(-1))
    labels = shifted_labels.reshape(-1)
    keep = labels != IGNORE_INDEX  # as in the chunked loss: no logits for prompt rows
    loss: torch.Tensor = loss_fn(head.weight, rows[keep], labels[keep])
    return loss.float()


class CausalLMLoss(torch.nn.Module):
    """``forward(**batch)`` → summed next-token loss of a PEFT causal LM."""

    def __init__(self, model: PeftModel, cross_entropy: LossKind = "full") -> None:
        super().__init__()
        self.model = model
        self.cross_entropy = cross_entropy

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sum (not the mean) of the losses of every target token."""
        # No KV cache: training never reuses one, and transformers only reads packed
        # sequences from position_ids when there is none.
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        if self.cross_entropy == "full":
            logits = self.model(**inputs).logits
            return causal_lm_loss(logits, labels, reduction="sum")
        base = self.model.get_base_model()
        hidden = base.get_decoder()(**inputs).last_hidden_state
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        head = base.get_output_embeddings()
        if self.cross_entropy == "liger":
            return _liger_loss(hidden, head, shifted)
        return chunked_cross_entropy(hidden, head, shifted)
