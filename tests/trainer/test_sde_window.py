"""``train.sde_window``: MixGRPO's progressive window of SDE steps, in the config and the loop."""

from __future__ import annotations

import json

import pytest

from shared.config import ConfigError
from tests.helpers.tiny import tiny_config
from trainer.collect import plan_epoch
from trainer.data import load_dataset

WINDOW = ["train.sde_window={size: 2, shift_every: 1, stride: 2}"]


def test_each_epoch_rolls_out_and_trains_its_window(tmp_path):
    from trainer.loop import train

    cfg = tiny_config(tmp_path, overrides=WINDOW + ["train.max_epochs=3", "train.num_inference_steps=8",
                                                    "train.group_size=2", "train.unique_sample_num_per_epoch=2",
                                                    "train.per_device_batch_size=4", "train.gradient_step_per_epoch=1"])
    rows, _ = load_dataset(cfg.data)
    # 8 steps: the window of 2 starts at 0, 2, then at most at T - w = 6 - 2 = 4
    assert [plan_epoch(cfg, rows, e, 0, 1).sde_steps for e in range(4)] == [[0, 1], [2, 3], [4, 5], [4, 5]]
    summary = train(cfg, quiet=True)
    assert summary["optimizer_steps"] == 3
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "tiny_grpo" / "metrics.jsonl").read_text().splitlines()]
    # GRPO replays each epoch's 2 window steps (its ratio starts at 1: the rollout's own log-probs)
    ratios = [m["train/ratio_mean"] for m in metrics if "train/ratio_mean" in m]
    assert len(ratios) == 3 and all(abs(r - 1) < 1e-3 for r in ratios)


@pytest.mark.parametrize("extra, message", [
    (["train.train_steps=[1, 2]"], "also choose them"),
    (["train.trainer_type=nft"], "dynamics_type is ODE"),
    (["train.sde_window.size=7"], r"size: 7 does not fit num_inference_steps=8.*at most 6"),
])
def test_window_config_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, overrides=WINDOW + ["train.num_inference_steps=8"] + extra)


def test_ode_tail_trains_the_same_steps_on_shorter_rollouts(tmp_path, monkeypatch):
    """``train.ode_tail`` (MixGRPO-Flash) with the window: each epoch's rollouts run the steps after
    the window's last one on fewer steps (MixGRPO's count), and GRPO replays the window steps' log-probs
    exactly (ratio 1 before the update), as without it."""
    import shared.sampling as sampling
    from trainer.loop import train

    grids = []
    real = sampling.rollout

    def recording(*a, **k):
        out = real(*a, **k)
        if k.get("dynamics") != "ODE":  # training rollouts, not evaluation
            grids.append((out.sde_steps, out.sigmas.shape[0] - 1))
        return out

    monkeypatch.setattr(sampling, "rollout", recording)
    cfg = tiny_config(tmp_path, overrides=WINDOW + ["train.max_epochs=2", "train.num_inference_steps=8",
                                                    "train.ode_tail={compress_ratio: 0.6}",
                                                    "train.group_size=2", "train.unique_sample_num_per_epoch=2",
                                                    "train.per_device_batch_size=4", "train.gradient_step_per_epoch=1"])
    assert cfg.train.ode_tail.solver == "dpm_solver++"
    train(cfg, quiet=True)
    # window [0, 1]: 6 steps after it -> floor(0.6 * 7) - 1 = 3; window [2, 3]: 4 after it -> floor(3) - 1 = 2
    assert sorted(set((tuple(s), n) for s, n in grids)) == [((0, 1), 2 + 3), ((2, 3), 4 + 2)]
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "tiny_grpo" / "metrics.jsonl").read_text().splitlines()]
    ratios = [m["train/ratio_mean"] for m in metrics if "train/ratio_mean" in m]
    assert len(ratios) == 2 and all(abs(r - 1) < 1e-3 for r in ratios)


@pytest.mark.parametrize("extra, message", [
    (["train.trainer_type=nft"], "does not train on SDE steps"),
    (["train.noise_aware_weighting=true"], "noise_aware_weighting normalizes"),
    (["train.ode_tail={compress_ratio: 0}"], "compress_ratio"),
    (["train.ode_tail={solver: rk4}"], "solver"),
])
def test_ode_tail_config_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, overrides=["train.ode_tail={compress_ratio: 0.4}"] + extra)
