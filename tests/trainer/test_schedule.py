"""``train.lr_schedule_clock``: the LR schedule over optimizer steps, or over whichever of the
step and wall-clock budgets runs out first (trainer/schedule.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_scheduler

from shared.config import ConfigError
from tests.helpers.tiny import tiny_config
from trainer.loop import schedule_steps, train
from trainer.schedule import budget_step, follow_budget, set_budget_fraction

FAST = ["train.num_inference_steps=4", "eval.num_inference_steps=4", "train.group_size=4",
        "train.unique_sample_num_per_epoch=2", "train.per_device_batch_size=8",
        "train.gradient_step_per_epoch=1", "train.lr_scheduler=cosine", "train.max_epochs=1000"]


def cosine(step: int, total: int) -> float:
    """diffusers' cosine multiplier without warm-up: 0.5 (1 + cos(pi step / total)), floored at 0."""
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * step / total)))


def _schedule(kind="cosine", total=100, lr=1.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return opt, get_scheduler(kind, opt, num_warmup_steps=0, num_training_steps=total)


def test_budget_step_is_the_clipped_share_of_the_steps():
    assert budget_step(0.5, 100) == 50
    assert budget_step(0.999, 100) == 99
    assert budget_step(1.7, 100) == 100 and budget_step(-0.2, 100) == 0


def test_follow_budget_reads_the_schedule_at_the_later_of_step_and_budget():
    opt, plain = _schedule()
    opt2, clocked = _schedule()
    follow_budget(clocked, 100)
    for _ in range(10):  # no time spent: the step schedule itself
        opt.step(), plain.step(), opt2.step(), clocked.step()
        assert clocked.get_last_lr() == plain.get_last_lr()
    set_budget_fraction(clocked, 0.6)  # 60% of the time gone at step 10
    opt2.step(), clocked.step()
    assert clocked.get_last_lr()[0] == pytest.approx(cosine(60, 100))
    set_budget_fraction(clocked, 0.05)  # behind the steps: the steps count
    opt2.step(), clocked.step()
    assert clocked.get_last_lr()[0] == pytest.approx(cosine(12, 100))
    set_budget_fraction(clocked, 1.3)  # over budget: the schedule's end
    opt2.step(), clocked.step()
    assert clocked.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_the_warmup_counts_in_steps_then_the_later_clock_rules():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    clocked = follow_budget(get_scheduler("cosine", opt, num_warmup_steps=4, num_training_steps=100), 100, 4)
    set_budget_fraction(clocked, 0.5)  # the clock is far ahead from the start
    lrs = []
    for _ in range(6):
        opt.step(), clocked.step()
        lrs.append(clocked.get_last_lr()[0])
    assert lrs[:3] == pytest.approx([0.25, 0.5, 0.75])  # the warm-up, step by step (steps 1-3 of 4)
    # from step 4 on: diffusers' cosine after warm-up, read at the budget's step 50
    assert lrs[3:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (50 - 4) / 96))] * 3)


def test_a_clocked_schedule_state_is_json_and_restores_its_budget_fraction():
    opt, clocked = _schedule()
    follow_budget(clocked, 100)
    set_budget_fraction(clocked, 0.25)
    opt.step(), clocked.step()
    state = json.loads(json.dumps(clocked.state_dict()))  # resume writes it into state.json
    opt2, again = _schedule()
    follow_budget(again, 100)
    again.load_state_dict(state)
    assert again.budget_fraction == 0.25 and again.last_epoch == 1
    opt2.step(), again.step()
    assert again.get_last_lr()[0] == pytest.approx(cosine(25, 100))


def test_budget_clock_without_a_time_budget_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="max_train_seconds is not set"):
        tiny_config(tmp_path, overrides=["train.lr_schedule_clock=budget"])


class FakeClock:
    """``time`` for trainer.loop: every ``time()`` call advances one second (deterministic)."""

    def __init__(self):
        self.now = 0.0

    def time(self) -> float:
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("clock", ["steps", "budget"])
def test_the_loop_runs_the_schedule_over_the_time_budget(tmp_path, monkeypatch, clock):
    monkeypatch.setattr("trainer.loop.time", FakeClock())
    budget = 40.0
    cfg = tiny_config(tmp_path, overrides=FAST + [f"train.max_train_seconds={budget}",
                                                  f"train.lr_schedule_clock={clock}"])
    total = schedule_steps(cfg)
    summary = train(cfg, quiet=True)
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/lr" in r]
    assert 3 <= len(rows) < 1000 and rows[-1]["time/train_seconds"] >= budget  # stopped by the clock
    lr = cfg.train.learning_rate
    ahead = 0
    for prev, row in zip([None] + rows[:-1], rows):
        at = row["train/optimizer_step"]
        if clock == "budget" and prev is not None:  # the clock as it stood after the previous epoch
            at = max(at, budget_step(prev["time/train_seconds"] / budget, total))
            ahead += at > row["train/optimizer_step"]
        assert row["train/lr"] == pytest.approx(lr * cosine(at, total), rel=1e-5)
    if clock == "budget":
        assert ahead == len(rows) - 1  # the time budget, not the 1000 epochs, drove the schedule
        assert rows[-1]["train/lr"] < 0.5 * lr  # past the cosine's middle when the budget ran out
    else:
        assert rows[-1]["train/lr"] > 0.99 * lr  # a few of 1000 epochs' steps: still near the top
