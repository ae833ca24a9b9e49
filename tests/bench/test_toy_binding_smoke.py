"""``bench/toy_binding.py`` at a tiny size on the shipped toy pipeline: the autoencoder round trip,
text distances and per-split binding table, written as JSON. One prompt x one seed per category
measures nothing; the checks are on what must hold for any model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from toy_binding import relative_distance  # noqa: E402


def test_relative_distance_closed_forms():
    a = torch.tensor([3.0, 4.0])
    assert relative_distance(a, a) == 0.0
    assert relative_distance(a, -a) == 2.0  # |2a| / |a|
    assert abs(relative_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) - 2 ** 0.5) < 1e-6


def test_toy_binding_runs_and_writes_json(tmp_path):
    out = tmp_path / "binding.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "toy_binding.py"), "--seeds", "1", "--prompts", "1",
         "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ae = result["autoencoder"]
    assert ae["scenes"] == 47 and ae["render_pass"] == 1.0  # ground-truth renders always pass
    assert 0.0 <= ae["round_trip_pass"] <= 1.0
    for name, d in result["text"].items():
        assert 0.0 < d["tokens"] < 2.0 and 0.0 < d["pooled"] < 2.0, name
    for which in ("train", "held_out"):
        cats = result["binding"][which]
        assert set(cats) == {"two_object", "counting", "colors", "position", "color_attr"}
        for r in cats.values():
            assert r["images"] == 1 and r["accuracy"] <= r["present"]  # correct implies every shape detected
            assert 0.0 <= r["shape_quality"] <= 1.0
            # the one image is either correct or wrong: its quality sits in exactly one of the two
            assert (r["shape_quality_correct"] is None) != (r["shape_quality_wrong"] is None)
            assert r["shape_quality"] in (r["shape_quality_correct"], r["shape_quality_wrong"])
    assert "acc|present" in proc.stdout and "shape_quality" in proc.stdout and "autoencoder" in proc.stdout
