"""The training loss: FedMoE's next-token loss equals transformers' own on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from fedmoe.batching import IGNORE_INDEX, collate, tokenize_examples
from fedmoe.data import load_examples
from fedmoe.demo_data import write_demo_datasets
from fedmoe.loss import causal_lm_loss
from fedmoe.modeling import load_base_model

pytestmark = pytest.mark.heavy(5)  # run early (tests/conftest.py)


def test_loss_matches_the_models_own_loss_with_prompt_masking(tmp_path) -> None:
    paths = write_demo_datasets(tmp_path, train_count=8, validation_count=2)
    base = load_base_model("tiny", device="cpu")
    examples = tokenize_examples(
        load_examples(paths["sql_expert"][0]), base.tokenizer, max_length=512
    )
    batch = collate(examples[:4], base.tokenizer.pad_token_id)
    assert (batch["labels"] == IGNORE_INDEX).any() and (batch["labels"] != IGNORE_INDEX).any()
    with torch.no_grad():
        output = base.model(**batch)  # transformers computes its loss from labels=
    ours = causal_lm_loss(output.logits, batch["labels"])
    torch.testing.assert_close(ours, output.loss, rtol=1e-5, atol=1e-6)
    total = causal_lm_loss(output.logits, batch["labels"], reduction="sum")
    counted = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(total / counted, output.loss, rtol=1e-5, atol=1e-6)


def _trainer(tmp_path, max_grad_norm: float):
    from fedmoe.config import TrainSettings
    from tests.train_helpers import tiny_lora_trainer

    paths = write_demo_datasets(tmp_path, train_count=16, validation_count=2)
    settings = TrainSettings(batch_size=2, max_grad_norm=max_grad_norm)
    return tiny_lora_trainer(paths["python_expert"][0], settings, max_length=256)


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_non_finite_steps_are_skipped_then_divergence_stops_training(
    tmp_path, max_grad_norm
) -> None:
    from fedmoe.modeling import adapter_state, lora_parameters
    from fedmoe.worker.trainer import MAX_NONFINITE_STEPS_IN_A_ROW, TrainingDiverged

    model, trainer = _trainer(tmp_path, max_grad_norm)
    assert not trainer.step().skipped
    before = adapter_state(model)
    moments = {id(p): s["exp_avg"].clone() for p, s in trainer.optimizer.state.items()}
    poisoned = next(iter(lora_parameters(model).values()))
    saved = poisoned.detach().clone()
    with torch.no_grad():
        poisoned.fill_(float("inf"))
    result = trainer.step()
    assert result.skipped and result.tokens == 0 and not math.isfinite(result.loss)
    with torch.no_grad():
        poisoned.copy_(saved)
    after = adapter_state(model)
    for name, tensor in before.items():  # nothing moved, optimizer state untouched
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)
    for parameter, state in trainer.optimizer.state.items():
        torch.testing.assert_close(state["exp_avg"], moments[id(parameter)], rtol=0, atol=0)
    assert not trainer.step().skipped  # recovers once the cause is gone
    with torch.no_grad():
        poisoned.fill_(float("nan"))
    for _ in range(MAX_NONFINITE_STEPS_IN_A_ROW - 1):
        assert trainer.step().skipped
    with pytest.raises(TrainingDiverged, match="lower --lr"):
        trainer.step()
