"""Synthetic demo datasets for three domain experts, generated offline from a seed.

* ``python_expert`` - "Write a Python function ..." prompts with small typed, documented
  functions as ``{"prompt", "completion"}`` or ``{"prompt", "reference_code"}`` records.
* ``sql_expert`` - questions over a small random schema answered with a ``SELECT`` query, as
  ``{"prompt", "completion"}`` records and a share of chat ``{"messages"}`` records.
* ``docs_expert`` - technical documentation paragraphs as ``{"text"}`` records and
  ``{"instruction", "input", "output"}`` records (some with an empty input).

Records render to roughly 170-250 characters, so they fit the tiny preset (one token per
byte) at ``max_length=256`` without truncation.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DOMAINS: tuple[str, ...] = ("python_expert", "sql_expert", "docs_expert")
_VALIDATION_SALT = 7919

_NOUNS = ("orders", "scores", "prices", "events", "rows", "hits", "logs", "ids")
_VERBS = ("get", "sum", "pick", "scale", "merge", "load", "count", "build")
_ARGS = ("xs", "vals", "items", "data", "nums", "seq")

# Python: (task, signature, docstring, body); {a} argument, {k} size, {m} = k - 1, {p} prefix.
_PY_TASKS = (
    (
        "sums the even numbers in a list",
        "({a}: list[int]) -> int",
        "Sum the even numbers in {a}.",
        "return sum(x for x in {a} if x % 2 == 0)",
    ),
    (
        "removes duplicates from a list, keeping order",
        "({a}: list[str]) -> list[str]",
        "Drop duplicates from {a}, keeping order.",
        "return list(dict.fromkeys({a}))",
    ),
    (
        "splits a list into chunks of {k}",
        "({a}: list[int]) -> list[list[int]]",
        "Split {a} into chunks of {k}.",
        "return [{a}[i : i + {k}] for i in range(0, len({a}), {k})]",
    ),
    (
        "clamps each number to the range 0..{k}0",
        "({a}: list[float]) -> list[float]",
        "Clamp {a} to [0, {k}0].",
        "return [min(max(x, 0), {k}0) for x in {a}]",
    ),
    (
        "counts the strings that start with '{p}'",
        "({a}: list[str]) -> int",
        "Count strings in {a} starting with '{p}'.",
        "return sum(s.startswith('{p}') for s in {a})",
    ),
    (
        "inverts a dict so values become keys",
        "({a}: dict[str, int]) -> dict[int, str]",
        "Map each value of {a} to its key.",
        "return {{v: k for k, v in {a}.items()}}",
    ),
    (
        "returns {k}-item moving averages",
        "({a}: list[float]) -> list[float]",
        "Return {k}-item moving averages of {a}.",
        "return [sum({a}[i : i + {k}]) / {k} for i in range(len({a}) - {m})]",
    ),
)

# SQL: each table's columns, and the numeric column, categorical column and that
# column's values its questions filter and group by.
_COLUMNS = {
    "customers": "id name email country spend",
    "orders": "id customer_id total status placed_at",
    "products": "id name category price stock",
    "employees": "id name department salary hired_at",
    "tickets": "id customer_id priority status wait_min",
}
_FILTERS = {
    "customers": ("spend", "country", "DE FR US JP BR"),
    "orders": ("total", "status", "paid shipped refunded pending"),
    "products": ("price", "category", "books garden toys audio"),
    "employees": ("salary", "department", "sales support finance research"),
    "tickets": ("wait_min", "priority", "low normal high urgent"),
}
# table -> (columns, numeric column, categorical column, categorical values)
_SCHEMAS = {
    table: (tuple(_COLUMNS[table].split()), number, category, tuple(values.split()))
    for table, (number, category, values) in _FILTERS.items()
}

_COMPONENTS = (
    "ingest-worker",
    "ledger-sync",
    "edge-proxy",
    "report-builder",
    "auth-gateway",
    "cache-warmer",
    "metrics-agent",
    "job-scheduler",
)
_SETTINGS = (
    ("max_batch_size", "the number of records processed per flush", ("64", "128", "512")),
    ("retry_backoff_ms", "the delay before a failed request is retried", ("250", "500", "2000")),
    ("log_level", "how much detail is written to the service log", ("info", "warn", "debug")),
    ("idle_timeout_s", "how long an idle connection is kept open", ("30", "60", "300")),
    ("worker_threads", "the number of threads serving requests", ("4", "8", "16")),
)
_SITUATIONS = (
    "the upstream is slow",
    "memory is limited",
    "you debug a failing deployment",
    "traffic spikes during business hours",
    "running on a single small VM",
)


def _identifier(rng: random.Random) -> str:
    return f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"


def _python(rng: random.Random) -> dict[str, Any]:
    task, sig, doc, body = rng.choice(_PY_TASKS)
    fields: dict[str, Any] = {
        "a": rng.choice(_ARGS),
        "k": rng.randint(2, 9),
        "p": rng.choice("abcxyz"),
    }
    fields["m"] = fields["k"] - 1
    name = _identifier(rng)
    prompt = f"Write a Python function `{name}` that {task.format(**fields)}."
    code = (
        f'def {name}{sig.format(**fields)}:\n    """{doc.format(**fields)}"""\n'
        f"    {body.format(**fields)}\n"
    )
    key = "reference_code" if rng.random() < 0.35 else "completion"
    return {"prompt": prompt, key: code}


def _sql_query(rng: random.Random, table: str) -> tuple[str, str]:
    columns, number, category, values = _SCHEMAS[table]
    kind = rng.randrange(4)
    if kind == 0:
        limit, low = rng.randint(3, 20), rng.randint(1, 99) * 10
        return (
            f"List the {limit} {table} with the highest {number} above {low}.",
            f"SELECT *\nFROM {table}\nWHERE {number} > {low}\n"
            f"ORDER BY {number} DESC\nLIMIT {limit};",
        )
    if kind == 1:
        return (
            f"Count the {table} for each {category}, most common first.",
            f"SELECT {category}, COUNT(*) AS n\nFROM {table}\n"
            f"GROUP BY {category}\nORDER BY n DESC;",
        )
    if kind == 2:
        value = rng.choice(values)
        column = rng.choice([c for c in columns if c not in ("id", category)])
        return (
            f"Show the id and {column} of every row in {table} whose {category} is '{value}'.",
            f"SELECT id, {column}\nFROM {table}\nWHERE {category} = '{value}';",
        )
    minimum = rng.randint(2, 25)
    return (
        f"Average {number} per {category} with at least {minimum} {table}.",
        f"SELECT {category}, AVG({number}) AS average\nFROM {table}\n"
        f"GROUP BY {category}\nHAVING COUNT(*) >= {minimum};",
    )


def _sql(rng: random.Random) -> dict[str, Any]:
    table = rng.choice(sorted(_SCHEMAS))
    question, query = _sql_query(rng, table)
    schema = f"{table}({', '.join(_SCHEMAS[table][0])})"
    if rng.random() < 0.25:
        return {
            "messages": [
                {"role": "system", "content": f"Schema: {schema}"},
                {"role": "user", "content": question},
                {"role": "assistant", "content": query},
            ]
        }
    return {"prompt": f"-- Table {schema}\n-- {question}\n", "completion": query}


def _docs(rng: random.Random) -> dict[str, Any]:
    component = rng.choice(_COMPONENTS)
    setting, meaning, defaults = rng.choice(_SETTINGS)
    default, other = rng.sample(defaults, 2)
    situation = rng.choice(_SITUATIONS)
    version = f"{rng.randint(1, 4)}.{rng.randint(0, 12)}"
    kind = rng.randrange(3)
    if kind == 0:
        return {
            "text": (
                f"## {component}: `{setting}`\n\n`{setting}` controls {meaning}. Default: "
                f"`{default}`. Use `{other}` when {situation}. Run `{component} reload` to "
                f"apply (v{version}+)."
            )
        }
    if kind == 1:
        note = (
            f"v{version}: `{component}` reads `{setting}` from the env; its default is "
            f"now `{default}` (was `{other}`)."
        )
        return {
            "instruction": "Summarise this release note in one sentence.",
            "input": note,
            "output": f"{component} {version} sets {setting} to {default} by default.",
        }
    return {
        "instruction": f"Explain what the `{setting}` setting of {component} does.",
        "input": "",
        "output": (
            f"`{setting}` controls {meaning}. The default is "
            f"`{default}`; consider `{other}` when {situation}."
        ),
    }


_GENERATORS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "python_expert": _python,
    "sql_expert": _sql,
    "docs_expert": _docs,
}


def _generate(domain: str, count: int, seed: int, exclude: set[str]) -> list[dict[str, Any]]:
    if domain not in _GENERATORS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = random.Random(f"{domain}:{seed}")
    records: list[dict[str, Any]] = []
    seen = set(exclude)
    for _ in range(count * 50 + 100):
        if len(records) == count:
            return records
        record = _GENERATORS[domain](rng)
        key = json.dumps(record, sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append(record)
    raise RuntimeError(f"could not generate {count} distinct {domain} examples")


def generate_domain(domain: str, count: int, *, seed: int) -> list[dict[str, Any]]:
    """Return ``count`` distinct records for ``domain``, deterministically from ``seed``."""
    return _generate(domain, count, seed, set())


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_demo_datasets(
    directory: Path, *, train_count: int = 400, validation_count: int = 60, seed: int = 0
) -> dict[str, tuple[Path, Path]]:
    """Write ``{directory}/{domain}/train.jsonl`` and ``validation.jsonl`` for every domain.

    Validation records come from a different seed and never repeat a training record.
    Returns ``{domain: (train_path, validation_path)}``.
    """
    directory = Path(directory)
    paths: dict[str, tuple[Path, Path]] = {}
    for domain in DOMAINS:
        train = generate_domain(domain, train_count, seed=seed)
        exclude = {json.dumps(record, sort_keys=True) for record in train}
        validation = _generate(domain, validation_count, seed + _VALIDATION_SALT, exclude)
        train_path = directory / domain / "train.jsonl"
        validation_path = directory / domain / "validation.jsonl"
        _write_jsonl(train_path, train)
        _write_jsonl(validation_path, validation)
        paths[domain] = (train_path, validation_path)
        logger.info("wrote %d + %d %s examples", len(train), len(validation), domain)
    return paths
