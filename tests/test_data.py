"""Tests for fedmoe.data (JSONL parsing), fedmoe.batching (masks, batches), fedmoe.demo_data."""

from __future__ import annotations

import json
import logging
from itertools import chain, islice
from pathlib import Path

import pytest
import torch

from fedmoe.batching import (
    IGNORE_INDEX,
    BatchStream,
    TokenizedExample,
    collate,
    count_trainable_tokens,
    example_segments,
    iterate_batches,
    tokenize_example,
    tokenize_examples,
    tokenize_training_set,
)
from fedmoe.data import DataFormatError, Example, load_examples, render_prompt, split_examples
from fedmoe.demo_data import DOMAINS, generate_domain, write_demo_datasets
from fedmoe.tiny import build_tiny_tokenizer

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def load_one(tmp_path: Path, record: dict) -> Example:
    (example,) = load_examples(write_lines(tmp_path / "data.jsonl", [json.dumps(record)]))
    return example


def trainable_text(tokenizer, item: TokenizedExample) -> str:
    ids = [label for label in item.labels if label != IGNORE_INDEX]
    return tokenizer.decode(ids)


def masked_text(tokenizer, item: TokenizedExample) -> str:
    ids = [
        tok for tok, label in zip(item.input_ids, item.labels, strict=True) if label == IGNORE_INDEX
    ]
    return tokenizer.decode(ids)


def test_text_format_trains_on_everything(tmp_path, tokenizer):
    item = tokenize_example(load_one(tmp_path, {"text": "def f(): pass"}), tokenizer, max_length=64)
    assert item.labels == item.input_ids
    assert tokenizer.decode(item.input_ids) == "def f(): pass" + EOS


@pytest.mark.parametrize("target", ["completion", "reference_code"])
def test_prompt_completion_masks_the_prompt(tmp_path, tokenizer, target):
    record = {"prompt": "Write add.", target: "def add(a, b):\n    return a + b"}
    item = tokenize_example(load_one(tmp_path, record), tokenizer, max_length=128)
    prompt_ids = tokenizer(render_prompt("Write add."), add_special_tokens=False)["input_ids"]
    assert item.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert all(label != IGNORE_INDEX for label in item.labels[len(prompt_ids) :])
    assert trainable_text(tokenizer, item) == record[target] + EOS
    assert masked_text(tokenizer, item) == "Write add.\n"


@pytest.mark.parametrize(
    ("extra", "expected_prompt"),
    [("", "Summarise.\n"), ("Some input.", "Summarise.\n\nSome input.\n"), (None, "Summarise.\n")],
)
def test_instruction_format(tmp_path, tokenizer, extra, expected_prompt):
    record = {"instruction": "Summarise.", "input": extra, "output": "A summary."}
    item = tokenize_example(load_one(tmp_path, record), tokenizer, max_length=128)
    assert masked_text(tokenizer, item) == expected_prompt
    assert trainable_text(tokenizer, item) == "A summary." + EOS


def chat(*turns: str) -> dict:
    """A ``messages`` record from role, content, role, content, ..."""
    pairs = zip(turns[::2], turns[1::2])
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


CHAT = chat(
    *("system", "Be brief.", "user", "Hi", "assistant", "Hello!"),
    *("user", "Bye", "assistant", "Goodbye."),
)


def test_messages_use_the_chat_template_and_train_on_assistant_turns(tmp_path, tokenizer):
    example = load_one(tmp_path, CHAT)
    item = tokenize_example(example, tokenizer, max_length=256)
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokenizer.decode(item.input_ids) == full + EOS
    assert trainable_text(tokenizer, item) == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n" + EOS
    masked = masked_text(tokenizer, item)
    assert "Be brief." in masked and "Hi" in masked and "Bye" in masked
    assert "Hello!" not in masked


def test_messages_without_chat_template_fall_back_to_plain_rendering(tmp_path, tokenizer):
    example = load_one(tmp_path, CHAT)
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    item = tokenize_example(example, plain, max_length=256)
    assert tokenizer.decode(item.input_ids).startswith("system: Be brief.\nuser: Hi\nassistant: ")
    assert trainable_text(plain, item) == "Hello!\nGoodbye.\n" + EOS
    assert example_segments(example)[-1] == ("Goodbye.\n", True)


def test_assistant_first_message_is_located(tmp_path, tokenizer):
    record = {
        "messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "x"}]
    }
    item = tokenize_example(load_one(tmp_path, record), tokenizer, max_length=256)
    assert trainable_text(tokenizer, item) == "Hi!"


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got array"),
    ('{"foo": 1}', "no recognised format (found keys: foo)"),
    ('{"prompt": "only a prompt"}', "{prompt, completion}"),
    ('{"text": 5}', "field 'text' must be a string, got number"),
    ('{"text": "  "}', "field 'text' is empty"),
    ('{"prompt": "p", "completion": null}', "field 'completion' must be a string, got null"),
    ('{"instruction": "", "output": "x"}', "field 'instruction' is empty"),
    ('{"instruction": "a", "input": 3, "output": "x"}', "field 'input' must be a string"),
    ('{"messages": []}', "field 'messages' is an empty list"),
    ('{"messages": "hi"}', "field 'messages' must be an array, got string"),
    ('{"messages": ["hi"]}', "messages[0] must be an object, got string"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0] has unknown role 'bot'"),
    ('{"messages": [{"role": "user"}]}', "messages[0] has no 'content' field"),
    ('{"messages": [{"role": "user", "content": 1}]}', "messages[0].content must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no non-empty assistant message"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_bad_line_reports_file_line_and_reason(tmp_path, line, reason):
    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "fine"}', "", line, '{"text": "x"}'])
    with pytest.raises(DataFormatError) as caught:
        load_examples(path)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert reason in str(caught.value)
    assert caught.value.line_number == 3 and caught.value.path == str(path)


def test_invalid_utf8_is_reported(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataFormatError, match=r"bytes\.jsonl:2: not valid UTF-8"):
        load_examples(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_examples(tmp_path / "nope.jsonl")
    path = write_lines(tmp_path / "blank.jsonl", ["", "   "])
    with pytest.raises(DataFormatError, match=r"blank\.jsonl: contains no examples"):
        load_examples(path)


def test_sources_and_blank_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}', "", '{"text": "b", "id": 7}'])
    examples = load_examples(path)
    assert [example.source for example in examples] == [f"{path}:1", f"{path}:3"]


def make_examples(count: int) -> list[Example]:
    return [Example(((f"example {index}", True),), line_number=index) for index in range(count)]


def test_split_is_deterministic_disjoint_and_complete():
    examples = make_examples(50)
    train, validation = split_examples(examples, validation_fraction=0.2, seed=3)
    assert (train, validation) == split_examples(examples, validation_fraction=0.2, seed=3)
    assert len(validation) == 10 and len(train) == 40
    assert {e.line_number for e in train}.isdisjoint({e.line_number for e in validation})
    assert sorted(e.line_number for e in train + validation) == list(range(50))
    assert split_examples(examples, validation_fraction=0.2, seed=4)[1] != validation


def test_split_edge_cases():
    assert len(split_examples(make_examples(2), validation_fraction=0.01)[1]) == 1
    assert split_examples(make_examples(1))[1] == []
    assert split_examples(make_examples(10), validation_fraction=0.0)[1] == []
    assert (
        len(split_examples(make_examples(100), validation_fraction=0.5, max_validation=7)[1]) == 7
    )
    for fraction in (-0.1, 1.0):
        with pytest.raises(ValueError, match="validation_fraction"):
            split_examples(make_examples(5), validation_fraction=fraction)


def test_truncation_and_dropping(tokenizer, caplog):
    long_prompt = Example((("x" * 40, False), ("answer", True)))
    short = Example((("q", False), ("a", True)))
    item = tokenize_example(long_prompt, tokenizer, max_length=16)
    assert len(item.input_ids) == 16 and set(item.labels) == {IGNORE_INDEX}
    with caplog.at_level(logging.WARNING, logger="fedmoe.batching"):
        kept = tokenize_examples([long_prompt, short], tokenizer, max_length=16)
    assert len(kept) == 1 and "dropped 1 of 2" in caplog.text
    no_eos = tokenize_example(short, tokenizer, max_length=16, add_eos=False)
    assert tokenizer.decode(no_eos.input_ids) == "qa"
    assert len(tokenize_training_set([long_prompt, short], tokenizer, max_length=16, source="d"))
    with pytest.raises(DataFormatError, match=r"^d\.jsonl: none of its 1 .*--max-length"):
        tokenize_training_set([long_prompt], tokenizer, max_length=16, source="d.jsonl")


def test_collate_pads_right_and_masks_labels(tokenizer):
    batch = [TokenizedExample([1, 2, 3], [IGNORE_INDEX, 2, 3]), TokenizedExample([4], [4])]
    out = collate(batch, pad_token_id=tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, pad, pad]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(tensor.dtype == torch.long for tensor in out.values())
    assert count_trainable_tokens(out) == count_trainable_tokens(batch) == 2
    with pytest.raises(ValueError):
        collate([], pad_token_id=0)


def test_batch_stream_is_seeded_and_covers_each_epoch():
    items = [TokenizedExample([index], [index]) for index in range(10)]
    first = [[i.input_ids[0] for i in b] for b in islice(BatchStream(items, 4, seed=1), 6)]
    again = [[i.input_ids[0] for i in b] for b in islice(BatchStream(items, 4, seed=1), 6)]
    assert first == again
    assert [len(batch) for batch in first] == [4, 4, 2, 4, 4, 2]
    epoch0, epoch1 = list(chain(*first[:3])), list(chain(*first[3:]))
    assert sorted(epoch0) == list(range(10)) == sorted(epoch1)
    assert epoch0 != epoch1  # reshuffled per epoch
    stream = BatchStream(items, 4, seed=1)
    next(stream)
    resumed = BatchStream(items, 4, seed=0)
    resumed.load_state_dict(stream.state_dict())
    assert next(resumed) == next(stream)


def test_iterate_batches_is_one_ordered_pass():
    items = [TokenizedExample([index], [index]) for index in range(5)]
    batches = list(iterate_batches(items, 2))
    assert [[i.input_ids[0] for i in batch] for batch in batches] == [[0, 1], [2, 3], [4]]


def test_demo_datasets_load_with_expected_counts(tmp_path, tokenizer):
    paths = write_demo_datasets(tmp_path, train_count=40, validation_count=10, seed=5)
    assert set(paths) == set(DOMAINS)
    keys_seen = set()
    for domain, (train_path, validation_path) in paths.items():
        assert train_path == tmp_path / domain / "train.jsonl"
        train, validation = load_examples(train_path), load_examples(validation_path)
        assert (len(train), len(validation)) == (40, 10)
        train_lines = set(train_path.read_text().splitlines())
        assert train_lines.isdisjoint(validation_path.read_text().splitlines())
        items = tokenize_examples(train + validation, tokenizer, max_length=256)
        assert len(items) == 50
        assert all(len(item.input_ids) < 256 for item in items)  # nothing truncated
        for line in train_lines:
            keys_seen.add(tuple(sorted(json.loads(line))))
    assert {("text",), ("messages",), ("completion", "prompt")} <= keys_seen
    assert {("prompt", "reference_code"), ("input", "instruction", "output")} <= keys_seen


def test_demo_domains_are_deterministic_and_distinct():
    assert generate_domain("sql_expert", 20, seed=1) == generate_domain("sql_expert", 20, seed=1)
    assert generate_domain("sql_expert", 20, seed=1) != generate_domain("sql_expert", 20, seed=2)
    text = {domain: json.dumps(generate_domain(domain, 30, seed=0)) for domain in DOMAINS}
    assert text["python_expert"].count("def ") >= 30 and "SELECT" not in text["python_expert"]
    assert text["sql_expert"].count("SELECT") >= 30 and "def " not in text["sql_expert"]
    assert "SELECT" not in text["docs_expert"] and "def " not in text["docs_expert"]
    for record in generate_domain("python_expert", 30, seed=0):
        compile(record.get("completion") or record["reference_code"], "<demo>", "exec")
    with pytest.raises(ValueError, match="unknown domain"):
        generate_domain("cooking_expert", 1, seed=0)


def test_tool_turns_are_context_not_targets(tmp_path, tokenizer):
    record = chat(
        *("user", "Weather in Oslo?", "assistant", "Calling get_weather."),
        *("tool", "12C, rain", "assistant", "It is 12C and raining."),
    )
    item = tokenize_example(load_one(tmp_path, record), tokenizer, max_length=256)
    trained = trainable_text(tokenizer, item)
    assert "Calling get_weather." in trained and "It is 12C and raining." in trained
    assert "12C, rain" not in trained and "12C, rain" in masked_text(tokenizer, item)
