"""The same training on 2 CPU processes under ``accelerate launch``: groups stay whole on one
process, DDP keeps the parameters identical on both ranks, and the run reproduces the
1-process run (per-sample seeds make rollouts independent of the process layout).

Launcher note: accelerate 1.15 runs ``accelerate launch --cpu --num_processes 2`` as ONE
process unless an MPI hostfile is given (its simple launcher), so this test uses the
torchrun-backed ``accelerate launch --multi_gpu --num_processes 2``, which on a machine without
CUDA starts 2 CPU processes with the gloo backend. The test checks that 2 ranks really ran."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

from tests.helpers.tiny import tiny_raw

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path):
    raw = tiny_raw(tmp_path, "grpo")
    # one optimizer step per epoch over the whole global batch, so both layouts take the same step
    raw["train"].update(max_epochs=2, clip_range=1e-3, per_device_batch_size=8,
                        gradient_step_per_epoch=1)
    # 3 images per prompt and a reward that compares them: a prompt's images must stay on one process
    raw["eval"]["images_per_prompt"] = 3
    raw["eval_rewards"] = [{"reward_model": "brightness"},
                           {"reward_model": "tests.helpers.rewards.GroupSize", "name": "group_size"}]
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "trainer.cli", "train", str(cfg_path),
         "--set", "run_name=two"])
    run([sys.executable, "-m", "trainer.cli", "train", str(cfg_path), "--set", "run_name=one"])
    two, one = tmp_path / "runs" / "two", tmp_path / "runs" / "one"

    # groups stay whole: each of the epoch's groups has all K members on exactly one rank
    assert (two / "rank1_state.json").is_file(), "the launcher started only one process"
    ranks = [json.loads((two / f"rank{r}_state.json").read_text()) for r in (0, 1)]
    per_rank = [Counter(r["last_epoch_group_ids"]) for r in ranks]
    k, m = raw["train"]["group_size"], raw["train"]["unique_sample_num_per_epoch"]
    assert all(n == k for c in per_rank for n in c.values())
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == m

    # gradients were synchronized: identical parameters on both ranks
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    assert ranks[0]["param_abs_sum"] == ranks[1]["param_abs_sum"]

    # same reward trend as one process (same samples; gradients equal up to float rounding)
    m2, m1 = metrics(two), metrics(one)
    key = "train/reward/brightness"
    t2, t1 = [x[key] for x in m2 if key in x], [x[key] for x in m1 if key in x]
    assert len(t2) == len(t1) == 2
    assert abs(t2[0] - t1[0]) < 1e-5  # epoch 1: same weights, same seeds -> same samples
    assert abs(t2[1] - t1[1]) < 1e-3
    e2 = [x["eval/reward/brightness"] for x in m2 if "eval/reward/brightness" in x]
    e1 = [x["eval/reward/brightness"] for x in m1 if "eval/reward/brightness" in x]
    assert abs(e2[0] - e1[0]) < 1e-5 and abs(e2[-1] - e1[-1]) < 1e-3
    # the eval grid shows the same prompts and seeds whatever the number of processes
    import numpy as np
    from PIL import Image

    grids = [np.asarray(Image.open(run / "images" / "eval_grid_epoch0000.png"), dtype=np.float64) for run in (one, two)]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).mean() < 1.0
    sizes = [x["eval/reward/group_size"] for m in (m1, m2) for x in m if "eval/reward/group_size" in x]
    assert sizes and all(size == 3 for size in sizes)  # every prompt's 3 images were scored together
    ones = json.loads((one / "rank0_state.json").read_text())
    assert abs(ones["param_abs_sum"] - ranks[0]["param_abs_sum"]) < 1e-3 * ones["param_abs_sum"]


def test_training_metrics_are_means_over_every_process(tmp_path):
    """trainer.loop.epoch_means on 2 processes: rank 0 sums loss 4 and only0 2 over 4 backward
    passes, rank 1 sums loss 8 and no only0: loss (4 + 8) / 8, only0 2 / 4 on both ranks; and
    trainer.collect.across_processes combines each process's queue metrics."""
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "tests.helpers.epoch_means_probe", str(tmp_path)])
    for rank in (0, 1):
        assert json.loads((tmp_path / f"means{rank}.json").read_text()) == {"train/loss": 1.5, "train/only0": 0.5}
        # queue metrics: the mean lag, the largest lag / wait / sampler count, summed counts
        assert json.loads((tmp_path / f"queue{rank}.json").read_text()) == {
            "queue/policy_lag": 1.0, "queue/policy_lag_max": 2.0, "queue/dropped_samples": 4.0,
            "queue/duplicates_total": 1.0, "queue/samplers": 3.0, "queue/collect_seconds": 4.0}
    # a NaN loss on one process stops both before the step (the other would wait for it forever)
    assert "another process's grpo loss is not finite" in json.loads((tmp_path / "finite0.json").read_text())
    assert "loss is nan at unit 0" in json.loads((tmp_path / "finite1.json").read_text())


def test_two_processes_resume_exactly(tmp_path):
    """A 2-process run resumed (2 processes) from its epoch-1 checkpoint ends with the weights
    of the uninterrupted 2-process run; each rank restored its own RNG file. With epochs
    overlapping (max_staleness 1) the checkpoint also holds each rank's sampled next epoch; a
    resume on ONE process samples that epoch again instead of reading rank-cut samples."""
    import shutil

    from safetensors.torch import load_file

    raw = tiny_raw(tmp_path, "grpo")
    raw["train"].update(max_epochs=3, save_freq=1, clip_range=1e-3, per_device_batch_size=8,
                        gradient_step_per_epoch=1, max_staleness=1)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run(launch + ["--main_process_port", str(free_port()), "-m", "trainer.cli", "train", str(cfg_path),
                  "--set", "run_name=full"])
    full = tmp_path / "runs" / "full"
    ckpt = full / "checkpoints" / "checkpoint-1"
    assert sorted(p.name for p in (ckpt / "resume").glob("rng-rank*.json")) == ["rng-rank0.json", "rng-rank1.json"]
    assert (ckpt / "resume" / "pending-rank1.safetensors").is_file()
    stopped, alone = tmp_path / "runs" / "stopped", tmp_path / "runs" / "alone"
    shutil.copytree(full, stopped)
    for extra in ("checkpoint-2", "final"):
        shutil.rmtree(stopped / "checkpoints" / extra)
    shutil.copytree(stopped, alone)
    run(launch + ["--main_process_port", str(free_port()), "-m", "trainer.cli", "train", str(cfg_path),
                  "--set", "run_name=stopped", "--resume", "latest"])
    lora = "checkpoints/final/lora/pytorch_lora_weights.safetensors"
    a, b = load_file(full / lora), load_file(stopped / lora)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    run([sys.executable, "-m", "trainer.cli", "train", str(cfg_path), "--set", "run_name=alone", "--resume", "latest"])
    assert (alone / lora).is_file()  # finished: the pending epoch was sampled again on one process
    resampled = [m for m in metrics(alone) if m.get("epoch") == 2.0 and "queue/policy_lag" in m]
    assert [m["queue/policy_lag"] for m in resampled] == [0.0]  # with the weights it is trained from
    kept = [m for m in metrics(stopped) if m.get("epoch") == 2.0 and "queue/policy_lag" in m]
    assert [m["queue/policy_lag"] for m in kept] == [1.0]  # the saved samples: one version behind


def test_two_processes_train_a_model_whose_last_block_leaves_weights_unused(tmp_path):
    """Qwen-Image's last block computes a text stream nothing reads, so its LoRA there gets no
    gradient; DDP has to be told to look for unused parameters (it stops the run otherwise)."""
    from tests.helpers.tiny_pipelines import TINY_PIPELINES, tiny_train_config

    spec = TINY_PIPELINES["qwen-image"]
    cfg = tiny_train_config(spec, spec.save(tmp_path / "pipe"), tmp_path, train={"per_device_batch_size": 2})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "trainer.cli", "train", str(path)])
    states = [json.loads((tmp_path / "runs" / "qwen-image" / f"rank{r}_state.json").read_text()) for r in (0, 1)]
    assert states[0]["param_checksum"] == states[1]["param_checksum"]


def test_an_epoch_with_dropped_groups_keeps_the_processes_in_step(tmp_path):
    """Each process loses one of its two prompt groups in epoch 0 (a different one on each), so
    that epoch has half the micro-batches one optimizer step plans for: the step it takes
    synchronizes gradients like any other, and DDP keeps both processes' weights identical after
    every epoch (an unsynchronized last step would leave each with its own gradient)."""
    raw = tiny_raw(tmp_path, "grpo")
    # per process: 2 groups of 8 in micro-batches of 4, one optimizer step over all of them
    raw["train"].update(max_epochs=2, clip_range=1e-3, per_device_batch_size=4, gradient_step_per_epoch=1)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "tests.helpers.dropped_groups_probe", str(tmp_path),
         str(cfg_path)])
    ranks = [json.loads((tmp_path / f"params{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    for epoch in (0, 1):
        assert ranks[0][epoch]["digest"] == ranks[1][epoch]["digest"], f"the processes' weights differ after epoch {epoch}"
        assert ranks[0][epoch]["step"] == ranks[1][epoch]["step"] == epoch + 1  # one step each epoch
    assert ranks[0][0]["sum"] != ranks[0][1]["sum"]
    # the groups were really lost: 16 samples trained in epoch 0, 32 in epoch 1
    assert json.loads((tmp_path / "runs" / "dropped" / "summary.json").read_text())["samples"] == 16 + 32


def test_processes_share_one_run_name_and_wait_for_a_slow_collect(tmp_path):
    """Without ``run_name`` every process takes the first process's time (rank 1 asks 1.5 s later), and
    processes of a queue run agree on their counts in a group that waits as long as a collect can take
    (rank 1 arrives 4 s late), where the default group gives up after ``train.dist_timeout_s`` (2 s here)."""
    from tests.trainer.test_fsdp import run_probe

    run_probe("dist_wait_probe.py", tmp_path)
    ranks = [json.loads((tmp_path / f"probe-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["name"] == ranks[1]["name"] and ranks[0]["name"].startswith("sd3-5_grpo_")
    assert [r["agreed"] for r in ranks] == [6, 6]
    assert ranks[0]["default_group"].startswith("RuntimeError") and "2000ms" in ranks[0]["default_group"], ranks[0]
