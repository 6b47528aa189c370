"""Example-level differential privacy for a worker's local training: DP-SGD with Opacus.

Each step draws a Poisson-sampled batch (every training example independently with
probability q), clips every example's gradient on the LoRA parameters to
``dp_max_grad_norm`` (C), sums them and adds Gaussian noise N(0, σ²C²) before the optimizer
step (Opacus' ``PrivacyEngine``: per-example gradients from hooks on the LoRA ``nn.Linear``
layers; the frozen base has none). Opacus' accountant (RDP or PRV) tracks the spent ε at the
chosen δ. Everything the worker uploads is computed from these noisy steps, so uploads are
post-processing and cost no privacy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel

from fedmoe.batching import TokenizedExample, collate, count_trainable_tokens
from fedmoe.config import TrainSettings
from fedmoe.loss import autocast_for, causal_lm_loss
from fedmoe.worker.trainer import LocalTrainer, StepResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP-SGD parameters of one worker, fixed before training starts."""

    noise_multiplier: float  # σ
    max_grad_norm: float  # C
    sample_rate: float  # q: each example's chance to be in a batch
    delta: float
    target_epsilon: float | None  # the budget; None: report ε, never stop for it
    accountant: str  # "rdp" or "prv"

    def epsilon_after(self, steps: int) -> float:
        """ε spent after ``steps`` DP-SGD steps, by a fresh Opacus accountant."""
        if steps <= 0:
            return 0.0
        from opacus.accountants import create_accountant

        accountant = create_accountant(self.accountant)
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]
        return float(accountant.get_epsilon(delta=self.delta))

    def steps_within_budget(self, limit: int = 10**7) -> int | None:
        """The most steps whose ε stays within the budget (None: no budget)."""
        if self.target_epsilon is None:
            return None
        high = 1  # ε grows with the steps: gallop up, then bisect
        while high < limit and self.epsilon_after(high) <= self.target_epsilon:
            high *= 2
        low, high = high // 2, min(high, limit)
        while low < high:
            middle = (low + high + 1) // 2
            if self.epsilon_after(middle) <= self.target_epsilon:
                low = middle
            else:
                high = middle - 1
        return low


def sample_rate_for(batch_size: int, dataset_size: int) -> float:
    """q as Opacus derives it from a data loader: 1 / number of batches per epoch."""
    return 1.0 / math.ceil(dataset_size / batch_size)


def plan_privacy(
    train: TrainSettings, *, dataset_size: int, planned_steps: int | None
) -> PrivacyPlan:
    """σ, q and δ for these settings (σ from the budget over ``planned_steps`` if not given)."""
    if not train.private:
        raise ValueError("plan_privacy needs dp_epsilon or dp_noise_multiplier")
    rate = sample_rate_for(train.batch_size, dataset_size)
    delta = train.dp_delta if train.dp_delta is not None else 1.0 / dataset_size
    sigma = train.dp_noise_multiplier
    if sigma is None:
        from opacus.accountants.utils import get_noise_multiplier

        assert train.dp_epsilon is not None and planned_steps is not None, "validated"
        sigma = float(
            get_noise_multiplier(
                target_epsilon=train.dp_epsilon,
                target_delta=delta,
                sample_rate=rate,
                steps=planned_steps,
                accountant=train.dp_accountant,
            )
        )
    return PrivacyPlan(
        noise_multiplier=sigma,
        max_grad_norm=train.dp_max_grad_norm,
        sample_rate=rate,
        delta=delta,
        target_epsilon=train.dp_epsilon,
        accountant=train.dp_accountant,
    )


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean next-token loss over its own target tokens (shape: batch).

    Their mean is the batch loss Opacus expects (``loss_reduction="mean"``): one example's
    gradient then never depends on the other examples in its batch.
    """
    tokens = causal_lm_loss(logits, labels, reduction="none").view(labels.shape)
    counted = (torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100).float()
    return (tokens * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1.0)


Row = tuple[torch.Tensor, torch.Tensor]  # one example's input ids and labels


class _Examples(torch.utils.data.Dataset[Row]):
    """The training set as tensor pairs (Opacus' data loader inspects its items' shapes)."""

    def __init__(self, examples: list[TokenizedExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Row:
        example = self.examples[index]
        return torch.tensor(example.input_ids), torch.tensor(example.labels)


def _collate(rows: list[Row], pad_token_id: int) -> dict[str, torch.Tensor]:
    examples = [TokenizedExample(ids.tolist(), labels.tolist()) for ids, labels in rows]
    return collate(examples, pad_token_id)


class PrivateTrainer(LocalTrainer):
    """``LocalTrainer`` with DP-SGD: Poisson batches, per-example clipping, Gaussian noise."""

    def __init__(
        self,
        model: PeftModel,
        examples: list[TokenizedExample],
        settings: TrainSettings,
        *,
        privacy: PrivacyPlan,
        **trainer_options: Any,
    ) -> None:
        """``trainer_options``: ``LocalTrainer``'s keyword arguments (pad token, device, lr)."""
        from opacus import PrivacyEngine

        super().__init__(model, examples, settings, **trainer_options)
        pad_token_id = self.pad_token_id
        self.privacy = privacy
        self.engine = PrivacyEngine(accountant=privacy.accountant)
        loader = torch.utils.data.DataLoader(
            _Examples(examples),
            batch_size=settings.batch_size,
            collate_fn=lambda rows: _collate(rows, pad_token_id),
            generator=torch.Generator().manual_seed(settings.seed),
        )
        # wrap_model=False: hooks on the PEFT model itself, which stays what the syncer reads
        self.hooks, self.optimizer, self.loader = self.engine.make_private(
            module=model,
            optimizer=self.optimizer,
            data_loader=loader,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=True,
            wrap_model=False,
        )
        if not math.isclose(privacy.sample_rate, 1.0 / len(self.loader)):
            raise RuntimeError("Opacus' sample rate differs from the plan's")
        self.budget_steps = privacy.steps_within_budget()
        self.private_batches = self._forever()

    def _forever(self) -> Iterator[Any]:
        while True:
            yield from self.loader

    @property
    def budget_spent(self) -> bool:
        """Whether one more step would take ε past the budget."""
        return self.budget_steps is not None and self.steps >= self.budget_steps

    def spent_epsilon(self) -> float:
        """ε spent so far, from the privacy engine's own accountant."""
        if self.steps == 0:
            return 0.0
        return float(self.engine.accountant.get_epsilon(delta=self.privacy.delta))

    def step(self) -> StepResult:
        """One DP-SGD step on a Poisson-sampled batch (an empty batch still adds noise)."""
        if not self.model.training:
            self.model.train()
        batch = next(self.private_batches)
        # Opacus hands an empty Poisson batch over as tensors with no rows (or, before any
        # batch was seen, as a list)
        rows = int(batch["input_ids"].shape[0]) if isinstance(batch, dict) else 0
        loss_value, tokens = 0.0, 0
        if rows:
            tokens = count_trainable_tokens(batch)
            batch = {key: value.to(self.device) for key, value in batch.items()}
            with autocast_for(self.device):
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            loss = per_example_loss(logits, batch["labels"]).mean()
            loss.backward()  # type: ignore[no-untyped-call]
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):  # nothing is released: no privacy spent
                self.optimizer.zero_grad(set_to_none=True)
                return self._skip(loss_value)
        else:  # no example drawn: the step is noise only, as the accountant assumes
            for parameter in self.parameters:
                parameter.grad_sample = torch.zeros((0, *parameter.shape), device=self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.nonfinite_in_a_row = 0
        return StepResult(loss=loss_value, tokens=tokens)


def build_trainer(
    model: PeftModel,
    examples: list[TokenizedExample],
    settings: TrainSettings,
    *,
    planned_steps: int | None,
    **kwargs: Any,
) -> LocalTrainer:
    """A ``PrivateTrainer`` when the settings ask for DP, else a plain ``LocalTrainer``."""
    if not settings.private:
        return LocalTrainer(model, examples, settings, **kwargs)
    plan = plan_privacy(settings, dataset_size=len(examples), planned_steps=planned_steps)
    logger.info(
        "DP-SGD: noise multiplier %.4g, clip %.4g, sample rate %.4g, delta %.3g, budget %s",
        plan.noise_multiplier,
        plan.max_grad_norm,
        plan.sample_rate,
        plan.delta,
        plan.target_epsilon,
    )
    return PrivateTrainer(model, examples, settings, privacy=plan, **kwargs)
