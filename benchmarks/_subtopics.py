"""IID and non-IID shards of the demo domains, non-IID by sub-topic within a domain.

``fedmoe.demo_data`` draws every record from a handful of templates: a Python task, an
SQL table, a documentation setting. A non-IID shard holds a contiguous run of sub-topics
(the examples sorted by sub-topic, then cut into equal parts), so each worker of an expert
sees only some of its domain's sub-topics, while the validation set covers them all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from benchmarks.common import Domain, shard
from fedmoe import demo_data
from fedmoe.batching import TokenizedExample
from fedmoe.demo_data import DOMAINS, generate_domain

SPLITS = ("iid", "non-iid")


def _markers(domain: str) -> list[str]:
    """Strings that identify each sub-topic of ``domain`` in a record's JSON text."""
    if domain == "python_expert":
        return [task.split("{")[0] for task, *_ in demo_data._PY_TASKS]
    if domain == "sql_expert":
        return [f"{table}(" for table in sorted(demo_data._SCHEMAS)]
    return [f"{setting}" for setting, *_ in demo_data._SETTINGS]


def subtopic(domain: str, record: dict[str, Any]) -> int:
    """The index of the template ``record`` was drawn from (its sub-topic)."""
    text = json.dumps(record)
    for index, marker in enumerate(_markers(domain)):
        if marker in text:
            return index
    raise ValueError(f"no {domain} sub-topic found in {text[:80]!r}")


def subtopics(domains: dict[str, Domain], *, train_count: int = 400) -> dict[str, list[int]]:
    """Each training example's sub-topic, in ``Domain.train`` order.

    ``benchmarks.common.demo_domains`` writes the records of ``generate_domain(d, n, seed=0)``
    in order and keeps all of them (they fit ``max_length``), so the i-th tokenized example
    is the i-th record; the lengths are checked.
    """
    labels = {}
    for domain in DOMAINS:
        records = generate_domain(domain, train_count, seed=0)
        if len(records) != len(domains[domain].train):
            raise ValueError(f"{domain}: {len(domains[domain].train)} examples, not {train_count}")
        labels[domain] = [subtopic(domain, record) for record in records]
    return labels


def split(
    examples: Sequence[TokenizedExample], labels: Sequence[int], count: int, index: int, how: str
) -> list[TokenizedExample]:
    """The ``index``-th of ``count`` disjoint, equal shards: interleaved, or by sub-topic."""
    if how == "iid":
        return shard(examples, count, index)
    order = sorted(range(len(examples)), key=lambda i: (labels[i], i))
    size = len(order) // count
    return [examples[i] for i in order[index * size : (index + 1) * size]]


def coverage(labels: Sequence[int], count: int) -> list[list[int]]:
    """The sub-topics each non-IID shard holds (for the report)."""
    order = sorted(labels)
    size = len(order) // count
    return [sorted(set(order[i * size : (i + 1) * size])) for i in range(count)]
