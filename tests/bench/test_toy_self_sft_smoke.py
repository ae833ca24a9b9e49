"""``bench/toy_self_sft.py`` at a tiny size: it samples, keeps what the verifier passes,
fine-tunes, evaluates (trained weights and EMA) and writes its JSON. One tiny round measures
nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


def test_toy_self_sft_runs_and_writes_json(tmp_path):
    out = tmp_path / "sft.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "toy_self_sft.py"), "--rounds", "1", "--prompts", "6",
         "--samples-per-prompt", "4", "--sample-steps", "4", "--steps", "2", "--batch", "4",
         "--eval-seeds", "1", "--ema", "0.9", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rounds"]
    assert row["sampled"] == 24 and 0 < row["kept"] <= 24
    assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
    for ev in (result["base"], row["heldout"], row["heldout_ema"]):
        assert set(ev["categories"]) == CATEGORIES and 0.0 <= ev["accuracy"] <= 1.0
