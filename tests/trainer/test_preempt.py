"""SIGTERM stops a run gracefully (:mod:`trainer.preempt`): the epoch in progress finishes, a
resumable checkpoint of it is written, the process exits 143, and ``--resume auto`` continues to
the weights of the run that was never stopped. With 2 processes, SIGTERM to the launcher reaches
both, and they stop after the same epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.helpers.tiny import tiny_raw
from tests.trainer.test_resume import FAST, same_tensors, weights
from trainer.preempt import EXIT_INTERRUPTED, EXIT_STOPPED, StopRequest

ROOT = Path(__file__).resolve().parents[2]
FLOWRL = [sys.executable, "-m", "trainer.cli"]
# one torch thread: the uninterrupted run must itself be bit-reproducible (see test_resume.py)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_sigterm_sets_the_request_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(announce=False) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested  # and this process is still alive
    assert signal.getsignal(signal.SIGTERM) == before


def config(root: Path, epochs: int) -> Path:
    from shared.config import apply_overrides

    raw = apply_overrides(tiny_raw(root), FAST + [f"train.max_epochs={epochs}", "train.save_freq=0"])
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def trained_epochs(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum("train/loss" in json.loads(x) for x in path.read_text().splitlines())


def stop_after(cmd: list[str], run_dir: Path, epochs: int, sig: int = signal.SIGTERM) -> subprocess.CompletedProcess:
    """Run ``cmd`` and send it ``sig`` once ``run_dir`` has logged ``epochs`` trained epochs."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while trained_epochs(run_dir) < epochs and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_sigterm_checkpoints_the_epoch_and_auto_resume_finishes_the_same_run(tmp_path):
    ref = subprocess.run(FLOWRL + ["train", str(config(tmp_path / "ref", 20))], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]

    cfg = config(tmp_path / "stopped", 20)
    run_dir = tmp_path / "stopped" / "runs" / "tiny_grpo"
    stopped = stop_after(FLOWRL + ["train", str(cfg)], run_dir, 2)
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert "finishing the epoch in progress" in stopped.stderr and "--resume auto" in stopped.stderr
    done = trained_epochs(run_dir)
    assert 2 <= done < 20, "the signal should land mid-run"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == [f"checkpoint-{done}"], f"one checkpoint, of the last trained epoch: {ckpts}"
    assert not (run_dir / "summary.json").exists()

    again = subprocess.run(FLOWRL + ["train", str(cfg), "--resume", "auto"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 20
    a = weights(tmp_path / "ref" / "runs" / "tiny_grpo" / "checkpoints" / "final")
    assert same_tensors(a, weights(run_dir / "checkpoints" / "final")) == []


def test_ctrl_c_stops_at_once_with_one_line_and_status_130(tmp_path):
    """SIGINT (Ctrl-C) is not a graceful stop: the run ends at once, saying how to continue, without
    a traceback (under a launcher, one per process)."""
    run_dir = tmp_path / "runs" / "tiny_grpo"
    stopped = stop_after(FLOWRL + ["train", str(config(tmp_path, 50))], run_dir, 1, signal.SIGINT)
    assert stopped.returncode == EXIT_INTERRUPTED == 130, stopped.stderr[-3000:]
    assert "flowrl: interrupted (Ctrl-C)" in stopped.stderr and "--resume latest" in stopped.stderr
    assert "Traceback" not in stopped.stderr and trained_epochs(run_dir) < 50


def test_sigterm_to_the_launcher_stops_both_processes_after_the_same_epoch(tmp_path):
    raw = tiny_raw(tmp_path, "grpo")
    raw["train"].update(max_epochs=40, per_device_batch_size=8, gradient_step_per_epoch=1, save_freq=0)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "runs" / raw["run_name"]
    stopped = stop_after(FLOWRL + ["train", str(cfg), "--processes", "2"], run_dir, 2)
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]  # (143, as one process: a restart retries)
    done = trained_epochs(run_dir)
    assert 2 <= done < 40
    ckpt = run_dir / "checkpoints" / f"checkpoint-{done}"
    states = sorted(p.name for p in (ckpt / "resume").glob("rng-rank*.json"))
    assert len(states) == 2, f"both processes wrote their part of checkpoint-{done}: {states}"

    again = subprocess.run(FLOWRL + ["train", str(cfg), "--processes", "2", "--resume", "auto"], cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 40 and summary["world_size"] == 2
    ranks = [json.loads((run_dir / f"rank{r}_state.json").read_text()) for r in (0, 1)]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
