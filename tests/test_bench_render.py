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
    run = document["values"]["runs"][0]
    run["rate"] = 1.25
    (tmp_path / "concurrency.json").write_text(json.dumps(document))
    output = tmp_path / "RESULTS.md"
    output.write_bytes(RESULTS.read_bytes())
    assert main(["--results-dir", str(tmp_path), "--output", str(output), "--check"]) == 1
    assert main(["--results-dir", str(tmp_path), "--output", str(output)]) == 0
    assert f"| {run['label']} | {run['acks']} | 1.2 |" in output.read_text()


def test_every_measured_section_is_rendered() -> None:
    # every benchmark's section has its JSON (the Qwen-shaped worker speeds need a GPU)
    gpu_only = {"worker-speed-qwen05b", "worker-speed-gpu"}
    assert {p.stem for p in RESULTS_DIR.glob("*.json")} == set(SECTIONS) - gpu_only
    markers = [line for line in RESULTS.read_text().splitlines() if line.startswith("<!-- BEGIN")]
    assert markers == [f"<!-- BEGIN {name} -->" for name in SECTIONS if name not in gpu_only]


def test_no_raw_results_outside_the_results_dir() -> None:
    # a benchmark writing its own JSON next to RESULTS.md would bypass the renderer
    assert sorted(RESULTS.parent.glob("*.json")) == []


def test_a_changed_serving_figure_changes_its_table(tmp_path: Path) -> None:
    document = json.loads((RESULTS_DIR / "serving.json").read_text())
    generation = document["values"]["generation"]
    single = generation["one adapter, 1 request"]["tokens_per_s"]
    generation["one adapter, batch of 3"]["tokens_per_s"] = 3 * single
    (tmp_path / "serving.json").write_text(json.dumps(document))
    text = render_results(tmp_path)
    assert f"| one adapter, batch of 3 | {3 * single:.0f} | 3.00× |" in text
    assert "<!-- BEGIN serving -->" in text and "<!-- BEGIN routing -->" not in text
