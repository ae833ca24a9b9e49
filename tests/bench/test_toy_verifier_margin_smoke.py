"""``bench/toy_verifier_margin.py`` at a tiny size on the shipped toy pipeline: it verifies perturbed
copies of passing samples and memorizes one passing image, and writes its JSON. Two memorization
steps measure nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_toy_verifier_margin_runs_and_writes_json(tmp_path):
    out = tmp_path / "margin.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "toy_verifier_margin.py"), "--seeds", "1", "--repeats", "1",
         "--noise", "0.0", "0.05", "--memorize-steps", "2", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    pert, mem = result["perturbation"], result["memorization"]
    assert pert["samples"] == 47 and 0 < pert["passed"] <= 47
    assert pert["retained"]["0.0"] == 1.0  # an unperturbed passing latent decodes to the same passing image
    assert 0.0 <= pert["retained"]["0.05"] <= 1.0
    assert 0 < mem["base_pass_rate"] <= 1 and 0.0 <= mem["pass_rate_after"] <= 1.0
    assert mem["latent_mse_to_memorized"] > 0
