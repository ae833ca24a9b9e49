"""``bench/toy_algorithms.py --from JSON`` writes docs/results.md's section from a saved run (how a
device run's JSON becomes the GPU table here) without training anything."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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
    saved = json.loads((ROOT / "bench" / "results" / "toy_algorithms_cpu.json").read_text())
    nft = [r for r in saved["runs"] if r["algorithm"] == "nft"]
    text = gpu_section(tmp_path, monkeypatch, tag="long", runs=nft)
    assert "<!-- toy_algorithms_gpu_long:start -->" in text
    assert f"### Toy world, nft: {saved['budget_train_seconds']:.0f} s of training each (gpu, long)" in text
    assert f"first evaluation (every {saved['eval_freq']} epochs, and the last)" in text


def test_set_file_lines_come_before_the_command_lines_set_flags(tmp_path, monkeypatch):
    """``--set-file``: key=value lines (comments and blanks skipped) reach every run, and a later
    ``--set`` of the same key wins because it is applied after them."""
    bench = load_bench()
    f = tmp_path / "protocol.set"
    f.write_text("# a protocol\n\ntrain.kl_beta=10  # the anchor\ntrain.guidance_scale=1.0\n")
    seen = []

    def fake_run_one(algorithm, budget, eval_freq, out_dir, extra):
        seen.append(list(extra))
        return {"algorithm": algorithm, "epochs": 1, "base_accuracy": 0.3, "final_accuracy": 0.4,
                "best_accuracy": 0.4, "points": [{"train_seconds": 0.0, "accuracy": 0.3}]}

    monkeypatch.setattr(bench, "run_one", fake_run_one)
    monkeypatch.setattr(bench, "write_section", lambda result: tmp_path / "results.md")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)  # main() changes into ROOT; put the test's folder back afterwards
    bench.main(["--algorithms", "nft", "--set-file", str(f), "--set", "train.kl_beta=1", "--tag", "t"])
    assert seen == [["train.kl_beta=10", "train.guidance_scale=1.0", "train.kl_beta=1"]]
    saved = json.loads((tmp_path / "bench" / "results" / "toy_algorithms_cpu_t.json").read_text())
    assert saved["overrides"] == seen[0]  # the JSON keeps what the file said when it ran

    from shared.config import load_config
    cfg = load_config(ROOT / "examples" / "toy" / "grpo.yaml", seen[0])
    assert cfg.train.kl_beta == 1 and cfg.train.guidance_scale == 1.0


def test_the_shipped_protocol_file_is_make_demos_recipe_for_every_algorithm():
    """bench/toy_cfgfree.set on nft.yaml gives nft_10min.yaml's training settings (but its name,
    length and eval cadence), and every algorithm's config accepts it."""
    from shared.config import load_config
    bench = load_bench()
    lines = bench.read_set_file(ROOT / "bench" / "toy_cfgfree.set")
    budget = ["train.max_train_seconds=570", "train.max_epochs=250", "eval.eval_freq=0", "run_name=toy_nft_10min"]
    demo = load_config(ROOT / "examples" / "toy" / "nft_10min.yaml").model_dump()
    nft = load_config(ROOT / "examples" / "toy" / "nft.yaml", lines + budget).model_dump()
    nft["train"].pop("kl_type"), demo["train"].pop("kl_type")  # nft's KL is v-based whatever the key says
    demo["train"]["log_samples_freq"] = nft["train"]["log_samples_freq"]  # a logging setting, not the recipe
    assert nft == demo
    for algorithm in bench.ALGORITHMS:
        cfg = load_config(ROOT / "examples" / "toy" / f"{algorithm}.yaml", lines + budget)
        assert cfg.train.guidance_scale == 1.0 and cfg.train.reference_guidance_scale == 4.5


def test_a_set_file_line_without_an_equals_sign_is_named(tmp_path):
    bench = load_bench()
    f = tmp_path / "bad.set"
    f.write_text("train.kl_beta=10\ntrain.guidance_scale 1.0\n")
    with pytest.raises(SystemExit, match="'train.guidance_scale 1.0' is not key=value"):
        bench.read_set_file(f)
    with pytest.raises(SystemExit, match="no such file"):
        bench.read_set_file(tmp_path / "missing.set")
