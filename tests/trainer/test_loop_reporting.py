"""The loop's reporting: reward details in eval (NaN-ignoring means), the report's details table,
before/after grids and reward-vs-time curve, and the wall-clock budget ``train.max_train_seconds``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.tiny import tiny_config
from trainer.loop import train
from trainer.reporting import detail_styles

FAST = ["train.num_inference_steps=4", "eval.num_inference_steps=4", "train.group_size=4",
        "train.unique_sample_num_per_epoch=2", "train.per_device_batch_size=8",
        "train.gradient_step_per_epoch=1", "rewards.0.reward_model=tests.helpers.rewards.BrightnessByColor"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("rep"), overrides=FAST + ["train.max_epochs=2"])
    summary = train(cfg, quiet=True)
    return cfg, summary, Path(summary["run_dir"])


def test_details_are_nan_ignoring_means_over_the_eval_prompts(run):
    from shared.rewards import build_reward

    cfg, summary, run_dir = run
    label = cfg.rewards[0].label
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if f"eval/reward/{label}" in e]
    keys = {f"eval/{label}/bright", f"eval/{label}/bright/red", f"eval/{label}/bright/blue"}
    assert keys <= set(evals[0]) and keys <= set(evals[-1])
    for e in (evals[0], evals[-1]):
        for k in keys:
            assert 0.0 <= e[k] <= 1.0
    # the reward's aggregate of the reduced means (summarize_details) is merged in
    for e in (evals[0], evals[-1]):
        assert e[f"eval/{label}/bright/by_color"] == pytest.approx(
            (e[f"eval/{label}/bright/red"] + e[f"eval/{label}/bright/blue"]) / 2)
    # the summary carries base and final of every detail
    assert summary[f"base/{label}/bright/red"] == evals[0][f"eval/{label}/bright/red"]
    assert summary[f"final/{label}/bright/red"] == evals[-1][f"eval/{label}/bright/red"]
    # the per-color value is the mean over exactly the prompts naming that color
    reward = build_reward("tests.helpers.rewards.BrightnessByColor")
    images = torch.rand(4, 3, 8, 8)
    prompts = ["a red x", "a blue y", "a red z", "a green w"]
    d = reward.details(images, prompts)
    assert torch.isnan(d["bright/red"][[1, 3]]).all() and not torch.isnan(d["bright/red"][[0, 2]]).any()


def test_report_has_details_table_before_after_grids_and_curve(run):
    cfg, summary, run_dir = run
    report = (run_dir / "report.md").read_text()
    label = cfg.rewards[0].label
    assert f"| {label}/bright/red |" in report
    # the details that fell below their base are named under the table (or "none")
    fell = [k for k in (f"{label}/bright/red", f"{label}/bright/blue", f"{label}/bright")
            if summary[f"final/{k}"] < summary[f"base/{k}"]]
    line = next(x for x in report.splitlines() if x.startswith("Below their base value: "))
    assert all(k in line for k in fell) and (fell or line == "Below their base value: none.")
    assert "## Before and after (same prompts, same seeds)" in report
    assert "images/eval_grid_epoch0000.png" in report and "images/eval_grid_epoch0002.png" in report
    assert "![reward vs time](reward_curve.png)" in report
    assert (run_dir / "reward_curve.png").stat().st_size > 1000
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [h for h in history if "train/loss" in h]
    times = [h["time/train_seconds"] for h in epochs]
    assert len(times) == 2 and 0 < times[0] < times[1]
    # the embedded (local) transport samples between epochs; that time counts as training time
    for h in epochs:
        assert h["time/epoch_seconds"] >= h["time/sample_seconds"] + h["time/optimize_seconds"] - 1e-3
    assert times[1] >= sum(h["time/sample_seconds"] + h["time/optimize_seconds"] for h in epochs) - 1e-3


def test_wall_clock_budget_stops_after_the_epoch_that_exceeds_it(tmp_path):
    cfg = tiny_config(tmp_path, overrides=FAST + ["train.max_epochs=50", "train.max_train_seconds=0.01"])
    summary = train(cfg, quiet=True)
    assert summary["epochs"] == 1 and summary["train_seconds"] >= 0.01
    state = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
    assert state["epoch"] == 1


def test_grid_shows_first_seed_of_prompts_spread_over_the_split():
    from trainer.evaluate import GRID_MAX, grid_picks, prompt_samples

    assert grid_picks([0, 1, 2, 3, 4, 5], 2) == [0, 2, 4]  # first image of each of 3 prompts
    picks = grid_picks(list(range(47 * 4)), 4)
    assert len(picks) == GRID_MAX and picks[0] == 0 and picks[-1] == 46 * 4
    assert all(p % 4 == 0 for p in picks) and picks == sorted(set(picks))
    # rank 1 of 2 holds prompts 1, 3, 5, ...: its positions point at samples j with j % k == 0
    mine = prompt_samples(1, 2, 10, 4)
    assert [mine[p] % 4 for p in grid_picks(mine, 4)] == [0] * 5


def test_each_process_evaluates_whole_prompts():
    from trainer.evaluate import prompt_samples

    assert prompt_samples(0, 2, 3, 2) == [0, 1, 4, 5] and prompt_samples(1, 2, 3, 2) == [2, 3]
    for world, prompts, k in [(1, 5, 3), (2, 5, 3), (3, 7, 4), (4, 2, 2)]:
        parts = [prompt_samples(r, world, prompts, k) for r in range(world)]
        assert sorted(j for part in parts for j in part) == list(range(prompts * k))  # each sample once
        assert all(len({j // k for j in part}) * k == len(part) for part in parts)  # whole prompts


def test_images_per_prompt_evaluates_every_prompt_k_times(tmp_path):
    from collections import Counter

    from tests.helpers.rewards import RecordingBrightness

    RecordingBrightness.seen.clear()
    cfg = tiny_config(tmp_path, overrides=FAST + [
        "train.max_epochs=1", "eval.images_per_prompt=3", "train.unique_sample_num_per_epoch=2",
        "rewards.0.reward_model=tests.helpers.rewards.RecordingBrightness"])
    train(cfg, quiet=True)
    eval_calls = [p for p in RecordingBrightness.seen if p[0] == "eval"]
    test_prompts = (tmp_path / "data" / "test.txt").read_text().split("\n")[:-1]
    # two evaluations (before and after), each scoring every test prompt exactly 3 times
    assert Counter(p for _, p in eval_calls) == Counter({q: 6 for q in test_prompts})


def test_a_groupwise_reward_evaluated_on_one_image_a_prompt_reports_no_score_not_zero(tmp_path):
    """The training reward compares a group's images; evaluation (reusing it, 1 image a prompt)
    has nothing to compare, so its eval reward is NaN, while a diversity eval over 3 images is not."""
    import math

    cfg = tiny_config(tmp_path, overrides=FAST + ["train.max_epochs=1", "rewards.0.reward_model=pairwise_brightness"])
    summary = train(cfg, quiet=True)
    assert math.isnan(summary["base/pairwise_brightness"]) and math.isnan(summary["final/pairwise_brightness"])
    assert (Path(summary["run_dir"]) / "report.md").is_file()
    written = json.loads((Path(summary["run_dir"]) / "summary.json").read_text(), parse_constant=pytest.fail)
    assert written["base/pairwise_brightness"] is None  # strict JSON: null, not NaN
    again = tiny_config(tmp_path / "k3", overrides=FAST + ["train.max_epochs=1", "eval.images_per_prompt=3",
                                                           "rewards.0.reward_model=pairwise_brightness"])
    assert not math.isnan(train(again, quiet=True)["base/pairwise_brightness"])


def test_diversity_shaping_scales_advantages_and_is_not_summed_as_a_reward(tmp_path):
    """GARDO's recipe end to end on the tiny model: brightness trained, std-free advantages, the
    diversity reward (tiny CLIP features) scaling the positive ones; it is logged, not summed."""
    from shared.config import parse_config
    from tests.helpers.tiny import tiny_raw
    from tests.helpers.tiny_clip import save_tiny_clip

    clip = save_tiny_clip(tmp_path / "clip")
    raw = tiny_raw(tmp_path, "nft")
    raw["train"].update(max_epochs=1, diversity_shaping="diversity", advantage_std=False, num_inference_steps=4)
    raw["rewards"] = [{"reward_model": "brightness"},
                      {"reward_model": "diversity", "model_name_or_path": str(clip), "reduce": "min"}]
    raw["eval_rewards"] = [{"reward_model": "brightness"}]
    summary = train(parse_config(raw), quiet=True)
    logged = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    epoch = next(m for m in logged if "train/diversity_scale_mean" in m)
    assert abs(epoch["train/diversity_scale_mean"] - 1) > 1e-6 and epoch["train/reward/diversity"] > 0
    assert "train/reward_diversity_mean" not in epoch  # not one of the rewards the advantages sum


def test_progress_bar_shows_geneval_accuracy_when_the_reward_reports_one():
    from trainer.reporting import progress_postfix

    metrics = {"train/reward/toy_geneval": 0.61234}
    ev = {"eval/reward/toy_geneval": 0.5154, "eval/toy_geneval/accuracy": 0.35594}
    assert progress_postfix(metrics, ev, "toy_geneval", "toy_geneval") == {
        "reward": "0.6123", "eval": "0.5154", "acc": "0.3559"}
    # a reward without an accuracy aggregate (brightness): no acc field; no eval yet: nan
    assert progress_postfix({}, {"eval/reward/b": 0.4}, "b", "b") == {"reward": "0.0000", "eval": "0.4000"}
    assert progress_postfix({}, {}, "b", "b")["eval"] == "nan"


def test_detail_styles_pair_families_by_name():
    keys = ["toy_geneval/accuracy", "toy_geneval/accuracy/position", "toy_geneval/accuracy/colors",
            "toy_geneval/present/position", "toy_geneval/present/colors"]
    styles = {k: (c, s) for k, c, s in detail_styles(keys)}
    assert styles["toy_geneval/accuracy/position"][0] == styles["toy_geneval/present/position"][0]
    assert styles["toy_geneval/accuracy/colors"][0] != styles["toy_geneval/accuracy/position"][0]
    assert styles["toy_geneval/accuracy/colors"][1] == styles["toy_geneval/accuracy/position"][1]
    assert styles["toy_geneval/accuracy/colors"][1] != styles["toy_geneval/present/colors"][1]
    assert len({c for c, _ in styles.values()}) == 3  # accuracy (overall), colors, position


def test_curve_of_a_long_run_draws_the_trend_and_every_detail(tmp_path):
    """Past 20 epochs the train reward also gets its 10-epoch trailing mean; every detail key is
    drawn (here one accuracy/present pair sharing a colour)."""
    import matplotlib

    matplotlib.use("Agg")
    from PIL import Image

    from trainer.reporting import plot_curves

    history = [{"train/reward/r": 0.5 + 0.01 * (i % 7), "time/train_seconds": 3.0 * i} for i in range(30)]
    evals = [{"time/train_seconds": s, "eval/reward/r": v, "eval/r/accuracy/a": v, "eval/r/present/a": v + 0.1}
             for s, v in ((0.0, 0.4), (90.0, 0.6))]
    path = plot_curves(tmp_path / "curve.png", history, evals, ["r"], "t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]


class _FakeTracker:
    """Stands in for the wandb / swanlab module: records init calls, hands out run ids."""

    def __init__(self):
        self.inits = []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return type("Run", (), {"id": kwargs.get("id") or f"run{len(self.inits)}"})()

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


@pytest.mark.parametrize("backend", ["wandb", "swanlab"])
def test_a_resumed_run_continues_its_online_run_and_a_new_one_opens_another(tmp_path, monkeypatch, backend):
    import sys

    from trainer.reporting import MetricLogger

    fake = _FakeTracker()
    monkeypatch.setitem(sys.modules, backend, fake)
    MetricLogger(backend, tmp_path, "p", "r", {}).close()
    assert "id" not in fake.inits[0]
    MetricLogger(backend, tmp_path, "p", "r", {}, resume=True).close()  # continued from a checkpoint
    assert fake.inits[1]["id"] == "run1" and fake.inits[1]["resume"] == "allow"
    MetricLogger(backend, tmp_path, "p", "r", {}).close()  # started over: a new online run
    assert "id" not in fake.inits[2]
    MetricLogger(backend, tmp_path, "p", "r", {}, resume=True).close()
    assert fake.inits[3]["id"] == "run3"


def test_a_group_grid_shows_each_group_in_a_row_with_its_scores(tmp_path):
    from PIL import Image

    from trainer.reporting import save_group_grid

    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0], [0, 1.0, 1.0]])
    images = colours[:, :, None, None].expand(5, 3, 8, 8).clone()
    groups = torch.tensor([7, 7, 3, 7, 3])  # two groups, interleaved as a rank's samples can be
    path = save_group_grid(images, groups, torch.tensor([0.1, 0.9, float("nan"), 0.5, 0.2]),
                           torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.5]), tmp_path / "g.png",
                           prompts=["a red square"] * 5, tile=32)
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (2 + 2 * (14 + 32 + 14 + 2), 2 + 3 * (32 + 2), 3)  # 2 rows, 3 columns (group 7's size)
    centre = lambda r, c: tuple(grid[2 + r * 62 + 14 + 16, 2 + c * 34 + 16])  # noqa: E731
    assert [centre(0, c) for c in range(3)] == [(255, 0, 0), (0, 255, 0), (255, 255, 0)]  # group 7: samples 0, 1, 3
    assert [centre(1, c) for c in range(2)] == [(0, 0, 255), (0, 255, 255)]  # group 3: samples 2, 4
    assert (grid[2: 2 + 14, 2: 60] < 128).any()  # the prompt above the first row
    assert (grid[2 + 14 + 32: 2 + 60, 2: 34] < 128).any()  # the scores under the first tile


def test_training_sample_grids_are_written_every_n_epochs(tmp_path):
    cfg = tiny_config(tmp_path, "grpo", ["train.max_epochs=2", "train.log_samples_freq=2",
                                         "train.num_inference_steps=4", "eval.num_inference_steps=4"])
    run_dir = Path(train(cfg, quiet=True)["run_dir"])
    assert sorted(p.name for p in (run_dir / "images").glob("train_samples_*")) == ["train_samples_epoch0002.png"]


def test_tensorboard_forgets_what_a_crashed_run_logged_after_the_checkpoint(tmp_path):
    """metrics.jsonl is cut back to the checkpoint on resume; TensorBoard showed the epochs after it twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.reporting import MetricLogger

    first = MetricLogger("tensorboard", tmp_path, "p", "r", {})
    for step in (1, 2, 3):  # the run dies after logging epoch 3, its checkpoint is at 2
        first.log({"train/loss": float(step)}, step)
    first.close()
    again = MetricLogger("tensorboard", tmp_path, "p", "r", {}, resume=True, purge_step=3)
    for step in (3, 4):
        again.log({"train/loss": 10.0 * step}, step)
    again.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
