"""Benchmarks measure, then report: raw results as JSON, RESULTS.md rendered from them.

A benchmark calls ``publish(section, title, values, args)``: the measurements
(``values``) and how they were taken (command, machine, date) go to
``benchmarks/results/<section>.json`` (or ``--results-dir``), and the section's Markdown is
printed. ``python -m benchmarks.render`` turns every JSON file into ``RESULTS.md``; the
narrative lives in ``benchmarks/templates``, never next to the measuring code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
RESULTS_DIR = HERE / "results"
HEADER = (
    "# Benchmark results\n\n"
    "Each section is written by the benchmark named in it; rerun the command to refresh it.\n"
    "Comparisons are ratios measured side by side in the same run.\n"
)
# section name -> the template module that renders it; also the order in RESULTS.md
SECTIONS = {
    "quality": "quality",
    "asynchrony": "asynchrony",
    "worker-speed": "worker_speed",
    "worker-speed-qwen05b": "worker_speed",
    "worker-speed-gpu": "worker_speed_gpu",
    "concurrency": "concurrency",
    "coordinator-speed": "coordinator_speed",
    "ack-latency": "ack_latency",
    "routing": "routing",
    "serving": "serving",
    "strategies": "strategies",
    "sync": "sync",
    "realsize": "realsize",
    "trust": "trust",
    "forget": "forget",
}


def machine() -> str:
    """A one-line description of this machine."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {device}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def run_meta() -> dict[str, Any]:
    """How this run was made: command line, machine and UTC time."""
    command = "python -m benchmarks." + Path(sys.argv[0]).stem + " " + " ".join(sys.argv[1:])
    return {
        "command": command.strip(),
        "machine": machine(),
        "run": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """``--write`` and ``--results-dir``, shared by every benchmark."""
    parser.add_argument(
        "--write", action="store_true", help="Record a --quick run in RESULTS.md too."
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="Where the JSON goes (default: benchmarks/results; a temp dir for --quick).",
    )


def results_dir(args: argparse.Namespace) -> Path:
    """The JSON directory of this run: a smoke run never overwrites the recorded results."""
    if args.results_dir is not None:
        return Path(args.results_dir)
    if args.quick and not args.write:
        return Path(tempfile.mkdtemp(prefix="fedmoe-bench-results-"))
    return RESULTS_DIR


def publish(section: str, title: str, values: dict[str, Any], args: argparse.Namespace) -> Path:
    """Write ``values`` as ``<section>.json`` and print the section (RESULTS.md: if recorded)."""
    directory = results_dir(args)
    directory.mkdir(parents=True, exist_ok=True)
    document = {"section": section, "title": title, "meta": run_meta(), "values": values}
    path = directory / f"{section}.json"
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    from benchmarks.render import render_section, write_results

    print("\n" + render_section(document), flush=True)
    print(f"(raw results: {path})", flush=True)
    if directory.resolve() == RESULTS_DIR.resolve():
        write_results(RESULTS_DIR, RESULTS)
        print(f"(rendered {RESULTS})", flush=True)
    return path


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
