"""Local LoRA training: AdamW over the adapter's parameters on a stream of batches.

One process, or one rank of several (``dist``): then every rank draws the same global
micro-batches, trains on its share under PyTorch DDP, and divides its summed loss by the
target tokens of the whole global micro-batch, so N ranks take the same step as one
process with the same ``--batch-size``. The speed switches (packing, chunked loss,
gradient checkpointing, torch.compile) are ``fedmoe.worker.speed``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel

from fedmoe.batching import BatchStream, TokenizedExample, count_trainable_tokens
from fedmoe.config import TrainSettings
from fedmoe.loss import autocast_for
from fedmoe.worker.speed import SpeedPlan, apply_model_switches, resolve_plan
from fedmoe.worker.train_step import CausalLMLoss, make_batch

if TYPE_CHECKING:
    from fedmoe.worker.distributed import DistContext

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


def _ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` under DDP; ranks start from the same broadcast adapter (``WorkerJob``),
    so no parameter sync at init, and the base model's buffers never change."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    accepted = inspect.signature(DistributedDataParallel).parameters
    options: dict[str, Any] = {  # torch 2.13 renamed broadcast_buffers
        "forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers": False
    }
    if "init_sync" in accepted:
        options["init_sync"] = False
    return DistributedDataParallel(module, device_ids=ids, **options)


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
        dist: DistContext | None = None,
        plan: SpeedPlan | None = None,
        compile_backend: str = "inductor",
    ) -> None:
        self.model, self.settings, self.device = model, settings, device
        self.pad_token_id, self.dist = pad_token_id, dist
        attention = getattr(model.get_base_model().config, "_attn_implementation", None)
        self.plan = plan or resolve_plan(settings, device, attention)
        apply_model_switches(model, self.plan, compile_backend=compile_backend)
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=learning_rate, weight_decay=settings.weight_decay
        )
        self.batches = iter(
            BatchStream(examples, batch_size=settings.batch_size, seed=settings.seed)
        )
        self.loss_module = CausalLMLoss(model, self.plan.cross_entropy)
        self.forward: torch.nn.Module = self.loss_module
        if dist is not None:
            self.forward = _ddp(self.loss_module, device)
        self.steps = 0
        self.nonfinite_in_a_row = 0

    def _micro_batch(self) -> tuple[dict[str, torch.Tensor], int, float]:
        """This process's share of the next global micro-batch: inputs, its targets, weight.

        A rank whose share is empty (an epoch's last, short batch) runs one example at
        weight 0 so that DDP's gradient all-reduce still sees every rank.
        """
        chunk = next(self.batches)
        share = chunk if self.dist is None else self.dist.shard(chunk)
        weight = 1.0 if share else 0.0
        batch = make_batch(share or chunk[:1], self.pad_token_id, packed=self.plan.packing)
        tokens = count_trainable_tokens(batch) if share else 0
        return {k: v.to(self.device) for k, v in batch.items()}, tokens, weight

    def step(self) -> StepResult:
        """Run ``grad_accum`` micro-batches and one optimizer step."""
        if not self.model.training:  # .train() walks every module: not on each step
            self.model.train()
        accum, world = self.settings.grad_accum, self.dist.world_size if self.dist else 1
        loss_sums, tokens = [], 0
        for index in range(accum):
            batch, mine, weight = self._micro_batch()
            total = mine if self.dist is None else self.dist.sum_int(mine)
            with self._sync_gradients(index == accum - 1):
                with autocast_for(self.device):
                    loss_sum = self.forward(**batch) * weight
                # DDP averages gradients over ranks: scale by world to get the global mean.
                (loss_sum * (world / (total * accum) if total else math.nan)).backward()
            loss_sums.append(float(loss_sum.detach()) / total if total else math.nan)
            tokens += total
        if self.dist is not None:  # the global means; every rank takes the same decision
            loss_sums = self.dist.sum_floats(loss_sums)
        mean_loss = sum(loss_sums) / len(loss_sums)
        if not (math.isfinite(mean_loss) and math.isfinite(self._clip_gradients())):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(mean_loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.nonfinite_in_a_row = 0
        return StepResult(loss=mean_loss, tokens=tokens)

    def _sync_gradients(self, last: bool) -> contextlib.AbstractContextManager[object]:
        """DDP all-reduces gradients only on the last micro-batch of a step."""
        no_sync = getattr(self.forward, "no_sync", None)
        if last or no_sync is None:
            return contextlib.nullcontext()
        return no_sync()  # type: ignore[no-any-return]

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
