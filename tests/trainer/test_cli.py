"""The ``flowrl`` command line, run as a real process: config errors exit 2 with one teaching
paragraph, ``check`` prints the batch geometry, ``train`` writes a complete run folder, and
``eval`` scores the checkpoint it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "toy" / "tiny_grpo.yaml"
# keep the end-to-end run short: fewer sampling steps and samples than the demo
FAST = ["train.max_epochs=2", "logging_backend=none", "eval.eval_freq=0",
        "train.num_inference_steps=4", "eval.num_inference_steps=4", "train.group_size=4",
        "train.unique_sample_num_per_epoch=2", "train.per_device_batch_size=8",
        "train.gradient_step_per_epoch=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def flowrl(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "trainer.cli", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def example_with(tmp_path: Path, **train_keys) -> Path:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["train"].update(train_keys)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_valid_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 0 and im.size[1] > 0


# --------------------------------------------------------------------------- config errors


def test_unknown_key_exits_2_with_suggestion(tmp_path):
    out = flowrl("check", example_with(tmp_path, clip_rnage=1e-3))
    assert out.returncode == 2, out.stderr
    assert "train.clip_rnage" in out.stderr
    assert "Did you mean `train.clip_range`?" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_key_exits_2_for_train_too(tmp_path):
    out = flowrl("train", example_with(tmp_path, clip_rnage=1e-3))
    assert out.returncode == 2 and "Did you mean" in out.stderr and "train.clip_rnage" in out.stderr


def test_ode_with_grpo_exits_2_naming_key_and_fix(tmp_path):
    out = flowrl("train", example_with(tmp_path, dynamics_type="ODE"))
    assert out.returncode == 2, out.stderr
    assert "train.dynamics_type" in out.stderr and "train.trainer_type" in out.stderr
    assert "Fix:" in out.stderr and "Flow-SDE" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_config_file_exits_2(tmp_path):
    out = flowrl("check", tmp_path / "nope.yaml")
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_bad_set_item_exits_2():
    out = flowrl("check", EXAMPLE, "--set", "train.learning_rate")
    assert out.returncode == 2 and "key=value" in out.stderr


# --------------------------------------------------------------------------- check


def test_list_shows_every_registered_name_and_describes_one():
    from shared.models import MODELS
    from shared.rewards import REWARDS
    from trainer.algorithms import ALGORITHMS

    for section, registry in (("rewards", REWARDS), ("models", MODELS), ("trainers", ALGORITHMS)):
        proc = flowrl("list", section)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert [line.split()[0] for line in lines] == registry.names()
        assert all(len(line.split()) > 1 for line in lines)  # each with a summary
    rewards = {line.split()[0]: line.split()[1] for line in flowrl("list", "rewards").stdout.splitlines()}
    assert rewards["pickscore_rank"] == "groupwise" and rewards["pairwise_brightness"] == "pairwise"
    one = flowrl("list", "rewards", "brightness")
    assert one.returncode == 0 and "kind: pointwise" in one.stdout and "options: target=None" in one.stdout
    bad = flowrl("list", "rewards", "brightnes")
    assert bad.returncode == 2 and "Did you mean 'brightness'?" in bad.stderr


def test_check_prints_geometry_json():
    out = flowrl("check", EXAMPLE)
    assert out.returncode == 0, out.stderr
    geo = json.loads(out.stdout)
    assert geo == {"world_size": 1, "group_size": 8, "groups_per_epoch": 4, "groups_per_rank": 4,
                   "samples_per_rank": 32, "micro_batch": 16, "batches_per_rank": 2,
                   "grad_steps_per_inner_epoch": 2, "batches_per_grad_step": 1,
                   "train_samples_per_rank": 32, "train_micro_batch": 16, "train_batches_per_rank": 2}


def test_check_world_size_and_set_overrides():
    out = flowrl("check", EXAMPLE, "--world-size", "2", "--set", "train.per_device_batch_size=8",
                 "--set", "train.gradient_step_per_epoch=1")
    assert out.returncode == 0, out.stderr
    geo = json.loads(out.stdout)
    assert (geo["world_size"], geo["groups_per_rank"], geo["batches_per_rank"]) == (2, 2, 2)


def test_check_set_breaks_divisibility_exits_2():
    out = flowrl("check", EXAMPLE, "--set", "train.unique_sample_num_per_epoch=3",
                 "--world-size", "2")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "train.unique_sample_num_per_epoch=3 is not divisible by the 2 processes" in out.stderr
    assert "Fix:" in out.stderr


def test_set_with_unknown_key_exits_2():
    out = flowrl("check", EXAMPLE, "--set", "train.learnig_rate=1e-4")
    assert out.returncode == 2 and "Did you mean `train.learning_rate`?" in out.stderr


# --------------------------------------------------------------------------- train + eval


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cli_runs")
    out = flowrl("train", EXAMPLE, *sets(FAST + [f"output_dir={out_dir}"]))
    return out, out_dir


def test_train_end_to_end(trained):
    out, out_dir = trained
    assert out.returncode == 0, out.stdout + out.stderr
    assert "base" in out.stdout and "final" in out.stdout and "report:" in out.stdout
    run = out_dir / "tiny_grpo_brightness"  # run_name from the example config
    assert (run / "report.md").is_file() and (run / "report.md").read_text().strip()
    assert_valid_png(run / "reward_curve.png")
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/reward/brightness" in ln for ln in lines)
    assert any("eval/reward/brightness" in ln for ln in lines)
    grids = sorted((run / "images").glob("eval_grid_epoch*.png"))
    assert grids, "no eval grid under images/"
    for grid in grids:
        assert_valid_png(grid)
    final = run / "checkpoints" / "final"
    assert (final / "lora" / "pytorch_lora_weights.safetensors").is_file()
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["config"]["output_dir"] == str(out_dir)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["checkpoint"] == str(final)
    assert not (run / "tensorboard").exists()  # logging_backend=none


def test_eval_checkpoint_prints_json(trained):
    out, out_dir = trained
    assert out.returncode == 0, "training failed; see test_train_end_to_end"
    run = out_dir / "tiny_grpo_brightness"
    ckpt = run / "checkpoints" / "final"
    ev = flowrl("eval", EXAMPLE, "--checkpoint", ckpt, *sets(FAST + [f"output_dir={out_dir}"]))
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    reward = result["eval/reward/brightness"]
    assert 0.0 <= reward <= 1.0
    # same eval settings, seeds and (EMA) weights as training's final evaluation
    summary = json.loads((run / "summary.json").read_text())
    assert reward == pytest.approx(summary["final/brightness"], abs=1e-5)
    assert result["grid"] and Path(result["grid"]).is_file()

    # --base: the untrained model, as training's base evaluation
    base = flowrl("eval", EXAMPLE, "--base", *sets(FAST + [f"output_dir={out_dir}"]))
    assert base.returncode == 0, base.stderr
    result = json.loads(base.stdout)
    assert result["eval/reward/brightness"] == pytest.approx(summary["base/brightness"], abs=1e-5)
    assert Path(result["grid"]).is_relative_to(run / "base_eval") and Path(result["grid"]).is_file()
    both = flowrl("eval", EXAMPLE, "--base", "--checkpoint", ckpt, *sets(FAST))
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_eval_of_a_non_checkpoint_dir_exits_2(tmp_path, capsys):
    # in-process (the model load is cheap once imported): the point is the message and status
    from trainer.cli import main

    code = main(["eval", str(EXAMPLE), "--checkpoint", str(tmp_path), *sets(FAST)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "is not a flowrl checkpoint" in err and str(tmp_path) in err
