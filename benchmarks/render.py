"""Render ``benchmarks/RESULTS.md`` from the benchmarks' JSON results, byte for byte.

Run ``python -m benchmarks.render`` (``--check`` only compares, ``--results-dir`` and
``--output`` pick other files). Each ``<section>.json`` holds ``meta`` (command, machine,
date; ``transcribed`` when the figures were copied from an earlier RESULTS.md,
``converted`` when they were moved from a benchmark's own earlier JSON file) and
``values`` (the measurements); ``benchmarks.templates.<module>.render(values)`` writes
the section's text.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.report import HEADER, RESULTS, RESULTS_DIR, SECTIONS


def render_section(document: dict[str, Any]) -> str:
    """One ``<!-- BEGIN name -->`` … ``<!-- END name -->`` block."""
    name, meta = document["section"], document["meta"]
    template = importlib.import_module(f"benchmarks.templates.{SECTIONS[name]}")
    body = template.render(document["values"])
    return (
        f"<!-- BEGIN {name} -->\n## {document['title']}\n\n"
        f"Command: `{meta['command']}`  \nMachine: {meta['machine']}  \nRun: {meta['run']}\n\n"
        f"{body.strip()}\n<!-- END {name} -->"
    )


def load_documents(directory: Path) -> list[dict[str, Any]]:
    """The JSON results in ``directory``, in RESULTS.md's section order."""
    documents = {}
    for name in SECTIONS:
        path = directory / f"{name}.json"
        if path.exists():
            documents[name] = json.loads(path.read_text())
    return list(documents.values())


def render_results(directory: Path) -> str:
    """The whole of RESULTS.md for the JSON files in ``directory``."""
    sections = [render_section(document) for document in load_documents(directory)]
    return HEADER + "".join(f"\n{section}\n" for section in sections)


def write_results(directory: Path = RESULTS_DIR, output: Path = RESULTS) -> None:
    """Render ``directory`` into ``output``."""
    output.write_text(render_results(directory))


def main(argv: list[str] | None = None) -> int:
    """Render (or with ``--check`` compare) RESULTS.md; 1 when ``--check`` finds a difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="Compare only; write nothing.")
    args = parser.parse_args(argv)
    text = render_results(args.results_dir)
    if args.check:
        same = args.output.exists() and args.output.read_text() == text
        print(f"{args.output}: {'up to date' if same else 'differs from the JSON results'}")
        return 0 if same else 1
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
