"""RESULTS.md is rendered from the benchmarks' JSON results, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.render import main, render_results
from benchmarks.report import RESULTS, RESULTS_DIR, SECTIONS


def test_results_md_is_the_rendering_of_the_json_results() -> None:
    assert render_results(RESULTS_DIR).encode() == RESULTS.read_bytes()


def test_every_section_has_its_json_and_provenance() -> None:
    for path in sorted(RESULTS_DIR.glob("*.json")):
        document = json.loads(path.read_text())
        assert document["section"] == path.stem and document["section"] in SECTIONS
        assert {"command", "machine", "run"} <= document["meta"].keys()
        assert f"<!-- BEGIN {path.stem} -->" in RESULTS.read_text()


def test_a_changed_figure_changes_the_rendering(tmp_path: Path) -> None:
    for path in RESULTS_DIR.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    document = json.loads((tmp_path / "concurrency.json").read_text())
    document["values"]["runs"][0]["rate"] = 1.25
    (tmp_path / "concurrency.json").write_text(json.dumps(document))
    output = tmp_path / "RESULTS.md"
    output.write_bytes(RESULTS.read_bytes())
    assert main(["--results-dir", str(tmp_path), "--output", str(output), "--check"]) == 1
    assert main(["--results-dir", str(tmp_path), "--output", str(output)]) == 0
    assert "| 30 processes × 1 thread, 20 s | 3880 | 1.2 |" in output.read_text()
