"""``bench/overlap_scoring.py`` runs end to end (one repeat) and writes its JSON: both modes timed
on the same plans, scores checked identical inside the bench. One repeat measures nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_overlap_scoring_bench_runs(tmp_path):
    out = tmp_path / "overlap.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "overlap_scoring.py"), "--repeats", "1",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["samples_per_epoch"] == 32 and r["micro_batch"] == 8
    assert set(r["epoch_rollout_and_score_s"]) == {"overlap_off", "overlap_on"}
    assert all(v > 0 for v in r["epoch_rollout_and_score_s"].values()) and r["scoring_alone_s"] > 0
