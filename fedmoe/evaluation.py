"""Validation loss of a model (base, expert or gateway) on tokenized examples."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from fedmoe.batching import TokenizedExample, collate, count_trainable_tokens, iterate_batches
from fedmoe.loss import autocast_for, causal_lm_loss


@torch.no_grad()
def validation_loss(
    model: PreTrainedModel,
    examples: list[TokenizedExample],
    *,
    pad_token_id: int,
    batch_size: int = 16,
) -> float:
    """Mean next-token loss per target token over ``examples`` (one deterministic pass)."""
    if not examples:
        raise ValueError("validation_loss needs at least one example")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in iterate_batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id).items()}
        with autocast_for(device):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        total += float(causal_lm_loss(logits, batch["labels"], reduction="sum"))
        count += count_trainable_tokens(batch)
    model.train(was_training)
    return total / max(count, 1)
