"""The narrative of each RESULTS.md section: ``render(values) -> str`` per module.

Templates only format what a benchmark measured (its JSON ``values``); they compute
nothing but the wording that depends on the figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from benchmarks.report import markdown_table

__all__ = ["Column", "column_table", "fmt", "loads", "markdown_table", "ms"]

T = TypeVar("T")
Column = tuple[str, Callable[[Any], object]]  # a table column: its header, its cell of an item


def fmt(value: float | None, digits: int = 3) -> str:
    """A float for a table, ``n/a`` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def ms(milliseconds: float) -> str:
    """Milliseconds as a short string (one decimal below 10 s)."""
    return f"{milliseconds:.1f}" if milliseconds < 10_000 else f"{milliseconds:.0f}"


def loads(values: Sequence[float], separator: str = ", ", brackets: bool = True) -> str:
    """Load averages (1, 5, 15 min) as ``(a, b, c)`` or ``a / b / c``."""
    text = separator.join(f"{x:.2f}" for x in values)
    return f"({text})" if brackets else text


def column_table(columns: Sequence[tuple[str, Callable[[T], object]]], items: Iterable[T]) -> str:
    """A markdown table of one row per item; each column is its header and its cell."""
    rows = [[cell(item) for _, cell in columns] for item in items]
    return markdown_table([header for header, _ in columns], rows)
