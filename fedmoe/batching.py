"""From examples to training batches: tokenisation with loss masks, collation, batch streams.

An :class:`~fedmoe.data.Example` becomes token ids and labels, where ``IGNORE_INDEX`` marks
the prompt positions that carry no loss; chat examples are rendered with the tokenizer's
chat template and trained on their assistant turns only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmoe.data import DataFormatError, Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    """Token ids and labels (``IGNORE_INDEX`` where no loss is taken) of one example."""

    input_ids: list[int]
    labels: list[int]


def _render(tokenizer: Any, messages: Sequence[tuple[str, str]], generation: bool) -> str:
    conversation = [{"role": role, "content": content} for role, content in messages]
    text = tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=generation
    )
    return str(text)


def _assistant_span(
    tokenizer: Any, example: Example, index: int, full: str, cursor: int
) -> tuple[int, int]:
    """Return ``(start, end)`` of assistant turn ``index`` in the full rendering."""
    messages = example.messages or ()
    try:
        if index:
            prefix = _render(tokenizer, messages[:index], True)
            turn = _render(tokenizer, messages[: index + 1], False)
            consistent = turn.startswith(prefix) and full.startswith(turn)
            if consistent and cursor <= len(prefix) < len(turn):
                return len(prefix), len(turn)
    except Exception:  # templates may reject partial conversations
        pass
    content = messages[index][1]  # fall back to finding the content verbatim
    start = full.find(content, cursor)
    if start < 0:
        reason = f"chat template does not render messages[{index}] content verbatim"
        raise DataFormatError(example.path, example.line_number, reason)
    return start, start + len(content)


def example_segments(example: Example, tokenizer: Any = None) -> tuple[tuple[str, bool], ...]:
    """Return the ``(text, trainable)`` segments of an example.

    Chat examples are rendered with the tokenizer's chat template (``tokenize=False``); only
    the assistant turns (content plus the template's end-of-turn marker) are trainable.
    Without a chat template they are rendered as ``"role: content\\n"`` lines.
    """
    if example.messages is None:
        return example.segments
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return tuple(
            part
            for role, content in example.messages
            for part in ((f"{role}: ", False), (f"{content}\n", role == "assistant"))
        )
    try:
        full = _render(tokenizer, example.messages, False)
    except Exception as error:
        reason = f"chat template failed: {error}"
        raise DataFormatError(example.path, example.line_number, reason) from error
    segments, cursor = [], 0
    for index, (role, _) in enumerate(example.messages):
        if role == "assistant":
            start, end = _assistant_span(tokenizer, example, index, full, cursor)
            segments += [(full[cursor:start], False), (full[start:end], True)]
            cursor = end
    segments.append((full[cursor:], False))
    return tuple((text, trainable) for text, trainable in segments if text)


def tokenize_example(
    example: Example, tokenizer: Any, *, max_length: int, add_eos: bool = True
) -> TokenizedExample:
    """Tokenise segment by segment; labels are the ids where trainable, ``IGNORE_INDEX`` elsewhere.

    A BOS token is prepended if the tokenizer normally adds one; EOS is appended (trainable
    when the last segment is) unless already present; the result is cut to ``max_length``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    segments = example_segments(example, tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trainable in segments:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        input_ids += ids
        labels += ids if trainable else [IGNORE_INDEX] * len(ids)
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])[:1]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and prefix == [bos] and input_ids[:1] != [bos]:
        input_ids, labels = [bos, *input_ids], [IGNORE_INDEX, *labels]
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None and input_ids[-1:] != [eos]:
        input_ids.append(eos)
        labels.append(eos if segments and segments[-1][1] else IGNORE_INDEX)
    return TokenizedExample(input_ids[:max_length], labels[:max_length])


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, *, max_length: int, add_eos: bool = True
) -> list[TokenizedExample]:
    """Tokenise examples, dropping those left with no trainable target after truncation."""
    kept = []
    for example in examples:
        item = tokenize_example(example, tokenizer, max_length=max_length, add_eos=add_eos)
        if any(label != IGNORE_INDEX for label in item.labels[1:]):
            kept.append(item)
    if len(kept) < len(examples):
        logger.warning(
            "dropped %d of %d examples with no trainable tokens within max_length=%d",
            len(examples) - len(kept),
            len(examples),
            max_length,
        )
    return kept


def tokenize_training_set(
    examples: Sequence[Example], tokenizer: Any, *, max_length: int, source: str | Path
) -> list[TokenizedExample]:
    """``tokenize_examples``, refusing a result with nothing left to train on."""
    kept = tokenize_examples(examples, tokenizer, max_length=max_length)
    if not kept:
        raise DataFormatError(
            source,
            None,
            f"none of its {len(examples)} training examples keeps a target token within "
            f"max_length={max_length}; raise --max-length or shorten the prompts",
        )
    return kept


def collate(batch: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        length = len(item.input_ids)
        input_ids[row, :length] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(item.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def count_trainable_tokens(batch: dict[str, torch.Tensor] | Sequence[TokenizedExample]) -> int:
    """Count the targets a causal-LM loss is taken over: labels not ``IGNORE_INDEX``, from 1.

    Position 0 is excluded because the model shifts labels left by one, so the first label is
    never predicted. Accepts a collated batch or a list of :class:`TokenizedExample`.
    """
    if isinstance(batch, dict):
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum().item())
    return sum(sum(label != IGNORE_INDEX for label in item.labels[1:]) for item in batch)


class BatchStream:
    """Endless stream of batches (lists of :class:`TokenizedExample`), reshuffled each epoch.

    Epoch ``e`` uses a permutation drawn from a generator seeded with ``(seed, e)``, so the
    stream is reproducible and can be resumed from :meth:`state_dict`. The last batch of an
    epoch may be smaller than ``batch_size``.
    """

    def __init__(self, examples: Sequence[TokenizedExample], batch_size: int, *, seed: int = 0):
        if not examples:
            raise ValueError("BatchStream needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples, self.batch_size, self.seed = list(examples), batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def __iter__(self) -> Iterator[list[TokenizedExample]]:
        return self

    def __next__(self) -> list[TokenizedExample]:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        indices = self._order[self.position : self.position + self.batch_size]
        self.position += len(indices)
        return [self.examples[index] for index in indices]

    def state_dict(self) -> dict[str, int]:
        """Return the stream position (seed, epoch, position) for resuming."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from a :meth:`state_dict` taken on a stream over the same examples."""
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


def iterate_batches(
    examples: Sequence[TokenizedExample], batch_size: int
) -> Iterator[list[TokenizedExample]]:
    """Yield one deterministic pass over ``examples`` in order, ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(examples), batch_size):
        yield list(examples[start : start + batch_size])
