"""Training data for one domain: JSONL parsing, validation, tokenisation and batching.

Each line of a JSONL file holds one JSON object in one of these formats (extra keys are
ignored; when several match, the first in this list wins):

* ``{"messages": [{"role": ..., "content": ...}, ...]}`` - rendered with the tokenizer's chat
  template; loss on the assistant turns only.
* ``{"instruction": ..., "input": ... (optional), "output": ...}`` - loss on ``output`` only.
* ``{"prompt": ..., "completion": ...}`` / ``{"prompt": ..., "reference_code": ...}`` - loss on
  the completion only.
* ``{"text": ...}`` - loss on every token.

A whole file is parsed and validated up front by :func:`load_examples`, so a bad line stops
everything before training starts, with a :class:`DataFormatError` naming ``file:line``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
ACCEPTED_FORMATS = (
    "{messages}",
    "{instruction, output[, input]}",
    "{prompt, completion}",
    "{prompt, reference_code}",
    "{text}",
)
_JSON_TYPES = {str: "string", int: "number", float: "number", bool: "boolean", list: "array"}


class DataFormatError(ValueError):
    """A data file is malformed; the message is ``f"{path}:{line_number}: {reason}"``.

    ``line_number`` is 1-based; it is ``None`` for whole-file problems (e.g. no examples),
    in which case the message is ``f"{path}: {reason}"``.
    """

    def __init__(self, path: str | Path, line_number: int | None, reason: str) -> None:
        self.path = str(path)
        self.line_number = line_number
        self.reason = reason
        where = self.path if line_number is None else f"{self.path}:{line_number}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Example:
    """One training example as ``(text, trainable)`` segments, or a chat conversation.

    Chat examples keep their ``messages`` as ``(role, content)`` pairs and have no segments:
    they are rendered with a tokenizer's chat template by :func:`example_segments`.
    """

    segments: tuple[tuple[str, bool], ...] = ()
    messages: tuple[tuple[str, str], ...] | None = None
    path: str = "<memory>"
    line_number: int = 0

    @property
    def source(self) -> str:
        """Where the example came from, as ``"file:line"``."""
        return f"{self.path}:{self.line_number}"


@dataclass
class TokenizedExample:
    """Token ids and labels (``-100`` where no loss is taken) of one example."""

    input_ids: list[int]
    labels: list[int]


def render_prompt(prompt: str) -> str:
    """Return ``prompt`` as it precedes a completion: a newline is added unless it is empty
    or already ends in whitespace. Use this at inference time to match training."""
    return prompt if not prompt or prompt[-1].isspace() else prompt + "\n"


def _type_name(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), "object")


def _get_str(obj: dict[str, Any], key: str, *, allow_empty: bool = True) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise ValueError(f"field '{key}' is empty")
    return value


def _parse_messages(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list):
        raise ValueError(f"field 'messages' must be an array, got {_type_name(value)}")
    if not value:
        raise ValueError("field 'messages' is an empty list")
    pairs = []
    for index, message in enumerate(value):
        name = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"{name} must be an object, got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{name} has no '{key}' field")
            if not isinstance(message[key], str):
                kind = _type_name(message[key])
                raise ValueError(f"{name}.{key} must be a string, got {kind}")
        if message["role"] not in ROLES:
            raise ValueError(
                f"{name} has unknown role {message['role']!r}; expected one of {ROLES}"
            )
        pairs.append((message["role"], message["content"]))
    if not any(role == "assistant" and content for role, content in pairs):
        raise ValueError("field 'messages' has no non-empty assistant message to train on")
    return tuple(pairs)


def _prompt_completion(prompt: str, completion: str) -> tuple[tuple[str, bool], ...]:
    return ((render_prompt(prompt), False), (completion, True))


def parse_record(obj: Any) -> Example:
    """Turn one decoded JSON value into an :class:`Example`; raise ``ValueError`` if invalid."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_type_name(obj)}")
    if "messages" in obj:
        return Example(messages=_parse_messages(obj["messages"]))
    if "instruction" in obj and "output" in obj:
        prompt = _get_str(obj, "instruction", allow_empty=False)
        extra = _get_str(obj, "input") if obj.get("input") is not None else ""
        prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        return Example(_prompt_completion(prompt, _get_str(obj, "output", allow_empty=False)))
    for target in ("completion", "reference_code"):
        if "prompt" in obj and target in obj:
            prompt, completion = _get_str(obj, "prompt"), _get_str(obj, target, allow_empty=False)
            return Example(_prompt_completion(prompt, completion))
    if "text" in obj:
        return Example(((_get_str(obj, "text", allow_empty=False), True),))
    found = ", ".join(sorted(obj)) or "none"
    accepted = ", ".join(ACCEPTED_FORMATS)
    raise ValueError(f"no recognised format (found keys: {found}); expected one of: {accepted}")


def _parse_line(path: Path, line_number: int, raw: bytes) -> Example | None:
    try:
        line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
        if not line.strip():
            return None
        example = parse_record(json.loads(line))
    except UnicodeDecodeError as error:
        raise DataFormatError(path, line_number, f"not valid UTF-8 ({error.reason})") from None
    except json.JSONDecodeError as error:
        reason = f"invalid JSON ({error.msg} at column {error.colno})"
        raise DataFormatError(path, line_number, reason) from None
    except ValueError as error:
        raise DataFormatError(path, line_number, str(error)) from None
    return replace(example, path=str(path), line_number=line_number)


def load_examples(path: Path) -> list[Example]:
    """Parse and validate every line of a JSONL file; blank lines are skipped.

    Raises ``FileNotFoundError`` when the file is missing and :class:`DataFormatError` for the
    first bad line (``file:line: reason``) or when the file holds no examples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data file not found: {path}")
    with path.open("rb") as handle:
        parsed = [_parse_line(path, number, raw) for number, raw in enumerate(handle, start=1)]
    examples = [example for example in parsed if example is not None]
    if not examples:
        raise DataFormatError(path, None, "contains no examples (the file is empty or blank)")
    logger.info("loaded %d examples from %s", len(examples), path)
    return examples


def split_examples(
    examples: Sequence[Example],
    *,
    validation_fraction: float = 0.1,
    max_validation: int = 200,
    seed: int = 0,
) -> tuple[list[Example], list[Example]]:
    """Deterministically split into ``(train, validation)`` by a seeded shuffle.

    Validation gets ``round(n * validation_fraction)`` examples, capped at ``max_validation``,
    at least one when there are two or more examples and the fraction is positive, and never
    all of them. Both parts keep the input order.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if max_validation < 0:
        raise ValueError(f"max_validation must be >= 0, got {max_validation}")
    count = len(examples)
    size = min(round(count * validation_fraction), max_validation, count - 1)
    if validation_fraction > 0 and max_validation > 0 and count >= 2:
        size = max(size, 1)
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held_out = set(order[: max(size, 0)])
    train = [ex for index, ex in enumerate(examples) if index not in held_out]
    return train, [ex for index, ex in enumerate(examples) if index in held_out]


def _render(tokenizer: Any, messages: Sequence[tuple[str, str]], generation: bool) -> str:
    conversation = [{"role": role, "content": content} for role, content in messages]
    return tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=generation
    )


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
    """Tokenise segment by segment; labels are the ids where trainable, ``-100`` elsewhere.

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


def resolve_pad_token_id(tokenizer: Any) -> int:
    """Return the tokenizer's pad token id, falling back to its EOS token id."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("tokenizer has neither a pad token nor an EOS token")


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
    """Count the targets a causal-LM loss is taken over: labels ``!= -100`` at positions >= 1.

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
