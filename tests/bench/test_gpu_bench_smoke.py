"""The GPU benchmarks (``bench/gpu``) run end to end in their ``--smoke`` mode on the CPU: miniature
models of the same classes through the same code paths (flowrl's rollout, ``trainer.loop.optimize``,
the whole trainer on a saved pipeline), writing the JSON keys issue 8 fixes. Smoke numbers measure
nothing; the real runs need the device (``bench/gpu/run_device.sh``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / f"{script}.py"), "--smoke", "--device", "cpu",
                           "--out", str(out), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("model", ["sd3-5", "flux1"])
def test_sampler_bench(tmp_path, model):
    r = run("sampler", tmp_path, "--model", model, "--batch", "2")
    (row,) = r["rows"]
    assert r["bench"] == "gpu_sampler" and r["smoke"] and r["cfg_batched"] == (model == "sd3-5")
    assert row["forward_rows"] == (4 if model == "sd3-5" else 2)
    assert row["img_s"] > 0 and row["limit_img_s"] > 0
    assert row["sampler_vs_limit"] == pytest.approx(row["img_s"] / row["limit_img_s"])


def test_sampler_variants_and_profile(tmp_path):
    # each option measured on top of the ones before it, in one run; the profile is a readable table
    profile = tmp_path / "profile.txt"
    r = run("sampler", tmp_path, "--batch", "2", "--variants", "noise_on_device", "cudnn_benchmark",
            "--profile", str(profile))
    assert [row.get("variant") for row in r["rows"]] == [None, "noise_on_device", "cudnn_benchmark"]
    assert list(r["variants"]) == ["noise_on_device", "cudnn_benchmark"]
    assert all(row["batch"] == 2 and row["img_s"] > 0 for row in r["rows"])
    assert "aten::" in profile.read_text()


def test_train_step_bench(tmp_path):
    r = run("train_step", tmp_path, "--batch", "2", "--gradient-checkpointing")
    (row,) = r["rows"]
    assert row["units"] == 2 and row["gradient_checkpointing"] and row["trainable_params_M"] > 0
    assert row["train_step_vs_raw"] == pytest.approx(row["ours_s"] / row["raw_s"])


def test_epoch_bench(tmp_path):
    r = run("epoch", tmp_path, "--algorithm", "grpo", "--workdir", str(tmp_path / "work"))
    assert r["bench"] == "gpu_epoch" and r["epochs"] == 2 and r["samples"] == 2 * r["images_per_epoch"]
    assert r["epoch_s"] > 0 and r["sample_s"] > 0 and r["train_s"] > 0 and "peak_gib" in r
