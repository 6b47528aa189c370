"""The frozen, versioned featurizer: how a request's text becomes a unit feature vector.

A request is featurized by the *base* model (any adapter disabled): the hidden states at
layer ``FeaturizerSettings.layer`` are pooled over the first ``prefix_tokens`` tokens of
what the request carries (:func:`request_text`: the prompt, or the start of a ``text``
record), then scaled to unit length. Workers featurize their training data with it to
build a domain signature (``fedmoe.signature``); routers featurize each request with the
same settings, so both sides agree on the features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fedmoe.batching import example_segments
from fedmoe.data import Example

# Bump whenever the features a given (model, settings, text) produce would change.
FEATURIZER_VERSION = "fedmoe-featurizer/1"
POOLINGS = ("mean", "last")


@dataclass(frozen=True)
class FeaturizerSettings:
    """How a text becomes a feature vector (part of every signature; must match to combine)."""

    layer: int = field(
        default=-1,
        metadata={"help": "Index into the model's hidden states (0 = embeddings, -1 = last)."},
    )
    prefix_tokens: int = field(
        default=32, metadata={"help": "P: only the first P tokens of a request are read."}
    )
    pooling: str = field(
        default="mean", metadata={"help": f"How the P hidden states are pooled: {POOLINGS}."}
    )
    version: str = field(default=FEATURIZER_VERSION, metadata={"help": "Featurizer version."})

    def __post_init__(self) -> None:
        if self.prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be >= 1, got {self.prefix_tokens}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeaturizerSettings:
        """Settings from :meth:`to_dict` output (unknown keys refused)."""
        unknown = set(data) - {"layer", "prefix_tokens", "pooling", "version"}
        if unknown:
            raise ValueError(f"unknown featurizer settings {sorted(unknown)}")
        return cls(
            layer=int(data.get("layer", -1)),
            prefix_tokens=int(data.get("prefix_tokens", 32)),
            pooling=str(data.get("pooling", "mean")),
            version=str(data.get("version", FEATURIZER_VERSION)),
        )


def request_text(example: Example, tokenizer: Any = None) -> str:
    """What a request for this example carries: its prompt, or else the start of its text.

    The untrained segments before the first trained one are the prompt (for chat records,
    the rendered conversation up to the first assistant turn); a ``text`` record has none,
    so its own beginning is what a request would carry.
    """
    segments = example_segments(example, tokenizer)
    prompt = ""
    for text, trainable in segments:
        if trainable:
            break
        prompt += text
    if prompt.strip():
        return prompt
    return "".join(text for text, _ in segments)


def _prefix_ids(texts: Sequence[str], tokenizer: Any, prefix_tokens: int) -> list[list[int]]:
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"])[:prefix_tokens] for t in texts]
    fallback = getattr(tokenizer, "eos_token_id", None) or 0
    return [row if row else [int(fallback)] for row in ids]  # an empty text still gets a row


@torch.no_grad()
def featurize(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    settings: FeaturizerSettings,
    *,
    batch_size: int = 32,
) -> torch.Tensor:
    """Unit-length features ``[len(texts), hidden]`` (float32, CPU) of the base model.

    A PEFT model's adapters are disabled while featurizing, so the features depend on the
    base weights only and every worker and router agree on them.
    """
    disable = getattr(model, "disable_adapter", None)
    if disable is not None and hasattr(model, "peft_config"):
        with disable():
            return _featurize(model, tokenizer, texts, settings, batch_size)
    return _featurize(model, tokenizer, texts, settings, batch_size)


def _featurize(
    model: Any, tokenizer: Any, texts: Sequence[str], settings: FeaturizerSettings, batch: int
) -> torch.Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = _prefix_ids(texts, tokenizer, settings.prefix_tokens)
    out = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        width = max(len(r) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        hidden = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True
        ).hidden_states[settings.layer]
        out.append(_pool(hidden.float().cpu(), mask, settings.pooling))
    model.train(was_training)
    features = torch.cat(out) if out else torch.zeros((0, model.config.hidden_size))
    return torch.nn.functional.normalize(features, dim=-1)


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "last":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    weights = mask.unsqueeze(-1).float()
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)
