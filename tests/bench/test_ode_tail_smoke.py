"""``bench/ode_tail.py`` runs every setting and records the forwards the arithmetic gives (the
timings and rewards themselves are the bench's business, not a test's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ode_tail_bench_records_each_setting(tmp_path):
    out = tmp_path / "tail.json"
    proc = subprocess.run([sys.executable, "bench/ode_tail.py", "--repeats", "1", "--seeds", "1", "--prompts", "3",
                           "--window", "4", "5", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    # 10 steps, window ending at step 5: 4 tail steps (5 points) -> floor(2.0) - 1 = 1 (ratio 0.4), 1 at least (0.2)
    assert [(r["setting"], r["forwards_per_rollout"]) for r in rows] == [
        ("plain", 10), ("euler 0.4", 7), ("dpm_solver++ 0.4", 7), ("dpm_solver++ 0.2", 7)]
    assert rows[0]["mean_abs_diff_to_plain"] == 0 and all(r["mean_abs_diff_to_plain"] > 0 for r in rows[1:])
    assert all(0 <= r["toy_geneval"] <= 1 and r["seconds"] > 0 for r in rows)
