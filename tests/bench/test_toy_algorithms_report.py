"""``bench/toy_algorithms.py --from JSON`` writes docs/results.md's section from a saved run (how a
device run's JSON becomes the GPU table here) without training anything."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("toy_algorithms_bench", ROOT / "bench" / "toy_algorithms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_section(tmp_path, monkeypatch, **changes) -> str:
    """docs/results.md (a fresh one under ``tmp_path``) after ``--from`` a copy of the committed CPU
    run with ``changes`` applied (a device run's JSON looks like it)."""
    bench = load_bench()
    result = json.loads((ROOT / "bench" / "results" / "toy_algorithms_cpu.json").read_text())
    result.update(device="gpu", gpu="NVIDIA H200", **changes)
    src = tmp_path / "run.json"
    src.write_text(json.dumps(result))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("# Measured results\n")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    bench.main(["--from", str(src)])
    return (tmp_path / "docs" / "results.md").read_text()


def test_from_json_replaces_its_section_and_keeps_the_rest(tmp_path, monkeypatch):
    bench = load_bench()
    src = ROOT / "bench" / "results" / "toy_algorithms_cpu.json"
    (tmp_path / "docs").mkdir()
    old = "<!-- toy_algorithms_cpu:start -->\nstale table\n<!-- toy_algorithms_cpu:end -->"
    (tmp_path / "docs" / "results.md").write_text(f"# Measured results\n\nbefore\n\n{old}\n\nafter\n")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    bench.main(["--from", str(src)])
    text = (tmp_path / "docs" / "results.md").read_text()
    assert text.startswith("# Measured results\n\nbefore\n\n<!-- toy_algorithms_cpu:start -->")
    assert text.endswith("<!-- toy_algorithms_cpu:end -->\n\nafter\n") and "stale table" not in text
    assert text.count("toy_algorithms_cpu:start") == 1
    assert bench.markdown(json.loads(src.read_text())) in text  # the tables of the saved run


def test_from_json_adds_a_gpu_section_with_its_numbers(tmp_path, monkeypatch):
    runs = json.loads((ROOT / "bench" / "results" / "toy_algorithms_cpu.json").read_text())["runs"]
    runs[0]["final_accuracy"] = 0.9123
    text = gpu_section(tmp_path, monkeypatch, budget_train_seconds=480.0, runs=runs)
    assert "<!-- toy_algorithms_gpu:start -->" in text and "grpo, grpo-guard, nft, awm: 480 s of training each (gpu)" in text
    assert "NVIDIA H200" in text and "| 0.912 |" in text


def test_a_tagged_run_has_its_own_section(tmp_path, monkeypatch):
    runs = json.loads((ROOT / "bench" / "results" / "toy_algorithms_cpu.json").read_text())["runs"]
    text = gpu_section(tmp_path, monkeypatch, tag="long", runs=runs[2:3])
    assert "<!-- toy_algorithms_gpu_long:start -->" in text and "### Toy world, nft: 150 s" in text
