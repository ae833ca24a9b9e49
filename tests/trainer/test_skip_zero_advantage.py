"""``train.skip_zero_advantage``: GRPO-family training only on the samples whose advantage is not zero
(as flow_grpo's scripts filter them), in as many micro-batches as planned, so processes stay in step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.config import ConfigError
from tests.helpers.tiny import tiny_config
from trainer import loop
from trainer.loop import informative_rows, train


def test_informative_rows_keeps_order_and_pads_to_the_minimum():
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    adv = torch.tensor([0.0, 1.2, 0.0, -0.4, 1e-7, 0.0, 2e-6, 0.0])  # 1e-7: a zero-std group's rounding
    assert informative_rows(perm, adv, 1).tolist() == [3, 6, 1]
    assert informative_rows(perm, adv, 5).tolist() == [5, 2, 3, 6, 1]  # the first zero rows of perm pad it
    assert informative_rows(perm, torch.zeros(8), 2).tolist() == [5, 2]
    assert informative_rows(perm, adv, 99).tolist() == perm.tolist()


def test_split_micro_batches_cover_every_row_once_in_near_equal_sizes():
    from tests.trainer.test_device_placement import _epoch_on

    data = _epoch_on("cpu", n=8)
    perm = torch.tensor([6, 1, 3, 0, 7])
    batches = list(loop.micro_batches(data, 4, seed=0, perm=perm, splits=3))
    assert [len(b.advantages) for b in batches] == [1, 2, 2]
    seen = torch.cat([b.group_ids for b in batches])
    assert seen.shape == (5,)
    assert [len(b.advantages) for b in loop.micro_batches(data, 4, seed=0, perm=perm)] == [4, 1]


def _spy(monkeypatch) -> list[dict]:
    """Each optimize call's micro-batch advantages and metrics."""
    seen: list[dict] = []
    real_optimize, real_batches = loop.optimize, loop.micro_batches

    def batches(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            seen[-1]["batches"].append(batch.advantages.detach().cpu().clone())
            yield batch

    def optimize(cfg, accelerator, policy, algorithm, optimizer, lr_schedule, data, *args, **kwargs):
        seen.append({"advantages": data.advantages.detach().cpu().clone(), "batches": []})
        step, metrics = real_optimize(cfg, accelerator, policy, algorithm, optimizer, lr_schedule, data, *args,
                                      **kwargs)
        seen[-1]["metrics"] = metrics
        return step, metrics

    monkeypatch.setattr(loop, "micro_batches", batches)
    monkeypatch.setattr(loop, "optimize", optimize)
    return seen


def test_zero_advantage_groups_are_not_trained(tmp_path, monkeypatch):
    """Groups of prompts without "red" all score 0.5: they are left out; every micro-batch still trains
    (2 per epoch, as planned), each on nonzero advantages only unless an epoch has too few of them."""
    seen = _spy(monkeypatch)
    cfg = tiny_config(tmp_path, "grpo", ["rewards=[{reward_model: tests.helpers.rewards.BrightnessForRed}]",
                                         "train.skip_zero_advantage=true", "train.max_epochs=4",
                                         "train.per_device_batch_size=8", "train.gradient_step_per_epoch=2"])
    train(cfg, quiet=True)
    assert len(seen) == 4 and any(0 < float((e["advantages"].abs() > 1e-6).float().mean()) < 1 for e in seen)
    for epoch in seen:
        informative = int((epoch["advantages"].abs() > 1e-6).sum())
        assert len(epoch["batches"]) == 4  # 32 samples / 8 per micro-batch, still 4 micro-batches
        trained = torch.cat(epoch["batches"])
        assert trained.shape[0] == max(informative, 4)
        if informative >= 4:
            assert bool((trained.abs() > 1e-6).all())
        assert epoch["metrics"]["train/kept_fraction"] == pytest.approx(trained.shape[0] / 32)


def test_with_nothing_to_skip_the_run_is_unchanged(tmp_path):
    """Brightness never ties within a group: skipping keeps every sample, in the same micro-batches."""
    from tests.trainer.test_resume import same_tensors, weights

    runs = [train(tiny_config(tmp_path / name, "grpo", extra), quiet=True)
            for name, extra in (("plain", []), ("skip", ["train.skip_zero_advantage=true"]))]
    assert same_tensors(*(weights(Path(r["checkpoint"])) for r in runs)) == []


def test_only_policy_gradient_trainers_take_it(tmp_path):
    with pytest.raises(ConfigError, match="train.skip_zero_advantage: nft learns from every sample"):
        tiny_config(tmp_path, "nft", ["train.skip_zero_advantage=true"])
    for kind in ("grpo-guard", "dppo"):
        assert tiny_config(tmp_path, kind, ["train.skip_zero_advantage=true"]).train.skip_zero_advantage


def test_two_processes_with_different_kept_counts_stay_in_step(tmp_path):
    """Each process keeps its own number of samples (its groups differ), in the same number of
    micro-batches: DDP's steps line up and the weights stay identical."""
    import json
    import sys

    import yaml

    from tests.helpers.tiny import tiny_raw
    from tests.trainer.test_multiprocess import free_port, metrics, run

    raw = tiny_raw(tmp_path, "grpo")
    raw["train"].update(max_epochs=4, per_device_batch_size=4, gradient_step_per_epoch=2, skip_zero_advantage=True)
    raw["rewards"] = [{"reward_model": "tests.helpers.rewards.BrightnessForRed"}]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "trainer.cli", "train", str(path), "--set", "run_name=two"])
    run_dir = tmp_path / "runs" / "two"
    ranks = [json.loads((run_dir / f"rank{r}_state.json").read_text()) for r in (0, 1)]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    kept = [m["train/kept_fraction"] for m in metrics(run_dir) if "train/kept_fraction" in m]
    assert len(kept) == 4 and min(kept) < 1, kept


@pytest.mark.parametrize("trainer_type", ["grpo", "nft"])
def test_a_date_like_seed_trains(tmp_path, trainer_type):
    """Derived sample and re-noising seeds exceed 2**64 from train.seed 18283 on: they are reduced
    (a seed such as 20240101 stopped the first rollout with an overflow)."""
    summary = train(tiny_config(tmp_path, trainer_type, ["train.seed=20240101", "train.max_epochs=1"]), quiet=True)
    assert summary["epochs"] == 1
