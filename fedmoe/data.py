"""Training data for one domain: JSONL formats, parsing, validation and splits.

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
Turning examples into token ids and batches is :mod:`fedmoe.batching`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")  # "tool": results of function calls
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
    if path.is_dir():
        raise FileNotFoundError(f"training data {path} is a directory, not a JSONL file")
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
