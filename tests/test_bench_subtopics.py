"""The strategy benchmark's shards: every demo record has a sub-topic; shards are disjoint."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks._subtopics import coverage, split, subtopic
from fedmoe.demo_data import DOMAINS, generate_domain


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_record_has_one_subtopic_and_all_subtopics_occur(domain: str) -> None:
    records = generate_domain(domain, 400, seed=0)
    labels = [subtopic(domain, record) for record in records]
    counts = Counter(labels)
    assert len(counts) >= 5  # at least as many sub-topics as the SQL tables / doc settings
    assert min(counts.values()) >= 400 // len(counts) // 2  # none is negligible


@pytest.mark.parametrize("count", [2, 4, 8])
def test_shards_are_disjoint_equal_and_non_iid_ones_narrow(count: int) -> None:
    records = generate_domain("sql_expert", 400, seed=0)
    labels = [subtopic("sql_expert", record) for record in records]
    examples = list(range(len(records)))  # split only indexes its examples
    for how in ("iid", "non-iid"):
        shards = [split(examples, labels, count, i, how) for i in range(count)]
        flat = [x for s in shards for x in s]
        assert len(flat) == len(set(flat)) and {len(s) for s in shards} == {400 // count}
        topics = [{labels[x] for x in s} for s in shards]
        if how == "iid":
            assert all(len(t) == len(set(labels)) for t in topics)
        else:
            assert max(len(t) for t in topics) <= len(set(labels)) // 2 + 1
            assert topics == [set(c) for c in coverage(labels, count)]


def test_an_unknown_record_is_refused() -> None:
    with pytest.raises(ValueError, match="no docs_expert sub-topic"):
        subtopic("docs_expert", {"text": "nothing from the generator"})
