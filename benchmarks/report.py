"""Write one benchmark's section of ``benchmarks/RESULTS.md`` (other sections are kept).

Each section sits between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` and
records the command that produced it and the machine it ran on.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Each section is written by the benchmark named in it; rerun the command to refresh it.\n"
    "Comparisons are ratios measured side by side in the same run.\n"
)


def machine() -> str:
    """A one-line description of this machine."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {device}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` in RESULTS.md."""
    command = "python -m benchmarks." + Path(sys.argv[0]).stem + " " + " ".join(sys.argv[1:])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"<!-- BEGIN {name} -->\n## {title}\n\n"
        f"Command: `{command.strip()}`  \nMachine: {machine()}  \nRun: {stamp}\n\n"
        f"{body.strip()}\n<!-- END {name} -->"
    )
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(
        rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.DOTALL
    )
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else (text.rstrip() + "\n\n" + section + "\n")
    )
    RESULTS.write_text(text)


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def publish(name: str, title: str, body: str, *, write: bool) -> None:
    """Print a section; write it to RESULTS.md only when ``write`` (not for smoke runs)."""
    print(f"\n## {title}\n{body}", flush=True)
    if write:
        write_section(name, title, body)
    else:
        print("(smoke run: RESULTS.md not changed; add --write to record it)")
