"""A non-finite loss stops training before the optimizer step it would spoil: the loop sums losses
and metrics on the device (no host sync per backward pass) and checks every loss of an optimizer
step at once, naming the first bad unit."""

from __future__ import annotations

import pytest
import torch

import trainer.loop as loop
from tests.helpers.tiny import tiny_config
from trainer.algorithms.grpo import GRPO


def test_nan_loss_names_the_unit_and_no_step_is_applied(tmp_path, monkeypatch):
    real_loss, steps = GRPO.loss, []

    def poisoned(self, batch, unit, state, policy):
        loss, metrics = real_loss(self, batch, unit, state, policy)
        return (loss * float("nan") if unit == 1 else loss), metrics

    real_step = loop._optimizer_step
    monkeypatch.setattr(GRPO, "loss", poisoned)
    monkeypatch.setattr(loop, "_optimizer_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    cfg = tiny_config(tmp_path, "grpo", ["train.max_epochs=1", "train.unique_sample_num_per_epoch=2",
                                         "train.group_size=4", "train.per_device_batch_size=8",
                                         "train.gradient_step_per_epoch=1", "eval.eval_freq=0"])
    with pytest.raises(FloatingPointError, match=r"epoch 0: grpo loss is nan at unit 1; the optimizer step was not applied"):
        loop.train(cfg, quiet=True)
    assert not steps


def test_metrics_are_read_back_as_floats(tmp_path):
    cfg = tiny_config(tmp_path, "grpo", ["train.max_epochs=1", "train.unique_sample_num_per_epoch=2",
                                         "train.group_size=4", "train.per_device_batch_size=8",
                                         "train.gradient_step_per_epoch=1", "eval.eval_freq=0"])
    loop.train(cfg, quiet=True)
    import json

    rows = [json.loads(x) for x in (tmp_path / "runs").rglob("metrics.jsonl").__next__().read_text().splitlines()]
    train = next(r for r in rows if "train/loss" in r)
    assert all(isinstance(v, float) for k, v in train.items() if k.startswith("train/"))
    assert torch.isfinite(torch.tensor(train["train/loss"]))
