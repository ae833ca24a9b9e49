"""``bench/prefix_sharing.py`` runs and records both settings per branch step, with the rows ratio of
the arithmetic (the timings themselves are the bench's business, not a test's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_prefix_sharing_bench_records_each_branch_step(tmp_path):
    out = tmp_path / "prefix.json"
    proc = subprocess.run([sys.executable, "bench/prefix_sharing.py", "--repeats", "1", "--groups", "1", "--k", "4",
                           "--branch-steps", "0", "5", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["branch_step"] for r in result["rows"]] == [0, 5]
    assert [r["rows_ratio"] for r in result["rows"]] == [1.0, (5 + 5 * 4) / 40]
    assert all(r["own_noise_s"] > 0 and r["shared_prefix_s"] > 0 for r in result["rows"])
