"""The training loss: FedMoE's next-token loss equals transformers' own on the tiny model."""

from __future__ import annotations

import torch

from fedmoe.data import collate, load_examples, tokenize_examples
from fedmoe.demo_data import write_demo_datasets
from fedmoe.modeling import load_base_model
from fedmoe.worker.trainer import causal_lm_loss


def test_loss_matches_the_models_own_loss_with_prompt_masking(tmp_path) -> None:
    paths = write_demo_datasets(tmp_path, train_count=8, validation_count=2)
    base = load_base_model("tiny", device="cpu")
    examples = tokenize_examples(
        load_examples(paths["sql_expert"][0]), base.tokenizer, max_length=512
    )
    batch = collate(examples[:4], base.tokenizer.pad_token_id)
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    with torch.no_grad():
        output = base.model(**batch)  # transformers computes its loss from labels=
    ours = causal_lm_loss(output.logits, batch["labels"])
    torch.testing.assert_close(ours, output.loss, rtol=1e-5, atol=1e-6)
    total = causal_lm_loss(output.logits, batch["labels"], reduction="sum")
    counted = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(total / counted, output.loss, rtol=1e-5, atol=1e-6)
