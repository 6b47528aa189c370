"""Local LoRA training: AdamW over the adapter's parameters on a stream of batches."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from peft import PeftModel

from fedmoe.batching import BatchStream, TokenizedExample, collate, count_trainable_tokens
from fedmoe.config import TrainSettings
from fedmoe.loss import autocast_for, causal_lm_loss

logger = logging.getLogger(__name__)

# A few non-finite steps (an fp16 overflow, one pathological batch) are skipped; this
# many in a row means training has diverged and going on would only burn compute.
MAX_NONFINITE_STEPS_IN_A_ROW = 10


class TrainingDiverged(RuntimeError):
    """Loss or gradients stayed non-finite; the adapter was left as it was before."""


@dataclass
class StepResult:
    """One optimizer step: mean loss over its micro-batches and target tokens trained.

    ``skipped`` steps had a non-finite loss or gradient: no parameter changed, and their
    loss and tokens must not be reported.
    """

    loss: float
    tokens: int
    skipped: bool = False


class LocalTrainer:
    """Trains the LoRA parameters of ``model``; the optimizer lives as long as the trainer."""

    def __init__(
        self,
        model: PeftModel,
        examples: list[TokenizedExample],
        settings: TrainSettings,
        *,
        pad_token_id: int,
        device: torch.device,
        learning_rate: float,
    ) -> None:
        self.model, self.settings, self.device = model, settings, device
        self.pad_token_id = pad_token_id
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=learning_rate, weight_decay=settings.weight_decay
        )
        self.batches = iter(
            BatchStream(examples, batch_size=settings.batch_size, seed=settings.seed)
        )
        self.steps = 0
        self.nonfinite_in_a_row = 0

    def step(self) -> StepResult:
        """Run ``grad_accum`` micro-batches and one optimizer step."""
        if not self.model.training:  # .train() walks every module: not on each step
            self.model.train()
        losses, tokens = [], 0
        for _ in range(self.settings.grad_accum):
            batch = collate(next(self.batches), self.pad_token_id)
            tokens += count_trainable_tokens(batch)
            batch = {key: value.to(self.device) for key, value in batch.items()}
            with autocast_for(self.device):
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            loss = causal_lm_loss(logits, batch["labels"]) / self.settings.grad_accum
            loss.backward()
            losses.append(float(loss.detach()) * self.settings.grad_accum)
        mean_loss = sum(losses) / len(losses)
        if not (math.isfinite(mean_loss) and math.isfinite(self._clip_gradients())):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(mean_loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.nonfinite_in_a_row = 0
        return StepResult(loss=mean_loss, tokens=tokens)

    def _clip_gradients(self) -> float:
        """Clip to ``max_grad_norm`` (0: no clipping) and return the gradients' total norm."""
        if self.settings.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.settings.max_grad_norm)
        else:
            grads = [p.grad for p in self.parameters if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
        return float(norm)

    def _skip(self, loss: float) -> StepResult:
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= MAX_NONFINITE_STEPS_IN_A_ROW:
            raise TrainingDiverged(
                f"training diverged: loss or gradients non-finite for "
                f"{self.nonfinite_in_a_row} steps in a row (last loss {loss}); "
                "lower --lr or check the data"
            )
        logger.warning("non-finite loss or gradient (loss %s): step skipped", loss)
        return StepResult(loss=loss, tokens=0, skipped=True)
