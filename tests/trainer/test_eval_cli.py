"""``flowrl eval`` measures what training's evaluation measured: under mixed precision, for a checkpoint
without EMA weights, without a run name; and ``eval.num_prompts`` keeps every data source evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer.test_cli import EXAMPLE, FAST, flowrl, sets
from trainer.data import PromptRow, eval_subset


@pytest.mark.parametrize("extra,evaluated", [(["train.mixed_precision=bf16", "train.ema_decay=0"],
                                               ["train.mixed_precision=bf16", "train.ema_decay=0"]),
                                              (["train.ema_decay=0"], [])], ids=["bf16", "no-ema"])
def test_eval_reproduces_trainings_base_and_final_evaluation(tmp_path, extra, evaluated):
    """bf16: training evaluates under autocast, and flowrl eval ran float32 (0.4741 vs training's 0.4744).
    no-ema: a run without EMA evaluated under a config with EMA scored its untrained EMA, the base model."""
    common = FAST + [f"output_dir={tmp_path}", "train.max_epochs=3", "train.learning_rate=0.05"] + extra
    out = flowrl("train", EXAMPLE, *sets(common))
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "tiny_grpo_brightness"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final/brightness"] != pytest.approx(summary["base/brightness"], abs=1e-4)  # it trained
    ev = flowrl("eval", EXAMPLE, "--checkpoint", run / "checkpoints" / "final", *sets(FAST + evaluated))
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(ev.stdout)
    assert result["eval/reward/brightness"] == pytest.approx(summary["final/brightness"], abs=1e-6)
    assert Path(result["grid"]).name == "eval_grid_epoch0003.png"  # the checkpoint's epoch
    if not evaluated:  # eval's config keeps the EMA on
        assert "holds no EMA weights" in ev.stderr
    base = flowrl("eval", EXAMPLE, "--base", *sets(FAST + evaluated + [f"output_dir={tmp_path}"]))
    assert base.returncode == 0, base.stderr[-3000:]
    assert json.loads(base.stdout)["eval/reward/brightness"] == pytest.approx(summary["base/brightness"], abs=1e-6)


def test_base_eval_without_a_run_name(tmp_path):
    """run_name unset: the grids go to <output_dir>/base_eval (it crashed on None)."""
    ev = flowrl("eval", EXAMPLE, "--base", *sets(FAST + [f"output_dir={tmp_path}", "run_name=null"]))
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert Path(json.loads(ev.stdout)["grid"]).is_relative_to(tmp_path / "base_eval")


def test_num_prompts_is_shared_among_the_sources():
    rows = [PromptRow(f"{s}{i}", dataset=s) for s, n in (("a", 5), ("b", 3), ("c", 1)) for i in range(n)]
    names = lambda picked: [r.prompt for r in picked]  # noqa: E731
    assert names(eval_subset(rows, 5)) == ["a0", "a1", "b0", "b1", "c0"]  # in turn, in the rows' order
    assert names(eval_subset(rows, 8)) == ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "c0"]
    assert eval_subset(rows, None) == rows and eval_subset(rows, 99) == rows
    one = [PromptRow(f"p{i}") for i in range(4)]
    assert eval_subset(one, 2) == one[:2]


def test_the_closing_lines_print_a_missing_score_as_n_a():
    from trainer.loop import _score

    assert [_score(v) for v in (0.47415, None, float("nan"))] == ["0.4742", "n/a", "n/a"]
