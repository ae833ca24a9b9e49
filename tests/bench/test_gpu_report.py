"""bench/gpu/report.py: docs/performance.md's GPU tables come from device result files only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "report.py"


def _report():
    spec = importlib.util.spec_from_file_location("bench_gpu_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sampler(smoke: bool, device: str, ratio: float) -> dict:
    return {"bench": "gpu_sampler", "model": "sd3-5", "smoke": smoke, "device": device, "gpu": "H", "torch": "t",
            "diffusers": "d", "resolution": 512, "steps": 10, "sde_steps": list(range(9)), "guidance": 4.5,
            "cfg_batched": True, "compile": "default", "compile_s": 60.0,
            "rows": [{"mode": "compiled", "batch": 16, "forward_rows": 32, "limit_img_s": 10.0, "img_s": 10 * ratio,
                      "sampler_vs_limit": ratio, "decode_s": 0.2, "peak_gib": 13.0}]}


def test_tables_use_device_results_only_and_name_their_files(tmp_path):
    report = _report()
    (tmp_path / "gpu_sampler_sd3-5.json").write_text(json.dumps(_sampler(False, "cuda", 0.9123)))
    (tmp_path / "gpu_sampler_smoke.json").write_text(json.dumps(_sampler(True, "cpu", 0.5555)))
    text = report.tables(tmp_path)
    assert "**0.912**" in text and "`gpu_sampler_sd3-5.json`" in text
    assert "0.555" not in text and "gpu_sampler_smoke.json" not in text
    assert "took 60 s the first call" in text
    # no step or epoch files: listed as not measured, no invented numbers
    assert "Not measured on a GPU yet (`bench/gpu/train_step.py`)" in text
    assert "Not measured on a GPU yet (`bench/gpu/epoch.py`)" in text

    doc = tmp_path / "performance.md"
    doc.write_text(f"before\n{report.START}\nold\n{report.END}\nafter\n")
    report.write_doc(text, doc)
    out = doc.read_text()
    assert out.startswith("before\n") and out.endswith("after\n") and "old" not in out and "**0.912**" in out


def test_epoch_and_step_tables(tmp_path):
    report = _report()
    epoch = {"bench": "gpu_epoch", "model": "sd3-5", "algorithm": "grpo", "smoke": False, "device": "cuda",
             "compile": "default", "images_per_epoch": 144, "batch": 8, "rollout_batch": 16, "epochs": 3,
             "epoch_s": 28.44,
             "sample_s": 17.0, "train_s": 11.0, "other_s": 0.44, "first_epoch_s": 190.0, "peak_gib": 40.0}
    (tmp_path / "gpu_epoch_grpo_compiled_sd3-5.json").write_text(json.dumps(epoch))
    text = report.tables(tmp_path)
    assert "| grpo | default | 16 | 144 | **28.4** | 17.0 | 11.0 | 0.4 | 190.0 | 40.0 |" in text
    (tmp_path / "gpu_epoch_grpo_compiled_sd3-5.json").write_text(json.dumps(
        {**epoch, "epochs": 1, "stopped_by_time_limit": True, "epoch_s": 190.0}))
    assert "**190.0** (first epoch only, not steady; stopped by the time limit) |" in report.tables(tmp_path)


def test_committed_doc_matches_the_committed_results():
    report = _report()
    doc = report.DOC.read_text()
    assert report.tables() in doc, "docs/performance.md is stale: run python bench/gpu/report.py"
