"""Online Diffusion-DPO (``train.trainer_type: dpo``): the pair selection and the loss against closed
forms, the batch geometry it trains in, and the training order that keeps pairs whole."""

from __future__ import annotations

import math

import pytest
import torch

from shared.config import ConfigError
from tests.helpers.tiny import tiny_config
from trainer.algorithms.losses import best_worst_pairs, dpo_loss


def test_best_worst_pairs_one_per_group_with_ties_and_singletons():
    scores = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.7, 0.3, 1.0, 0.4, 0.4])
    groups = torch.tensor([5, 5, 5, 2, 2, 9, 7, 7, 7])
    winners, losers, valid = best_worst_pairs(scores, groups)
    # group 5: best 1, worst 0; group 2: a tie (first is best, last is worst) -> invalid; 9: alone -> no pair;
    # group 7: best 6, worst the last of the two 0.4s
    assert winners.tolist() == [1, 3, 6] and losers.tolist() == [0, 4, 8]
    assert valid.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="must both be"):
        best_worst_pairs(scores, groups[:3])


def test_dpo_loss_closed_forms():
    err_ref = torch.tensor([1.0, 2.0, 0.5, 0.5])
    winners, losers, valid = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([True, True])
    # policy == reference: z = 0, loss = log 2, accuracy 0 (no pair has z > 0)
    loss, m = dpo_loss(err_ref.clone(), err_ref, winners, losers, valid, beta=100.0)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["dpo_margin"].item() == 0.0 and m["dpo_accuracy"].item() == 0.0
    # winner fitted better by 0.01 relative to the reference in pair 0, loser worse by 0.02 in pair 1:
    err = err_ref + torch.tensor([-0.01, 0.0, 0.0, 0.02])
    loss, m = dpo_loss(err, err_ref, winners, losers, valid, beta=100.0)
    z = torch.tensor([-50.0 * (-0.01 - 0.0), -50.0 * (0.0 - 0.02)])  # -(beta/2) [(dw) - (dl)]
    assert loss.item() == pytest.approx(float(-torch.nn.functional.logsigmoid(z).mean()), rel=1e-5)
    assert m["dpo_accuracy"].item() == 1.0 and m["dpo_margin"].item() == pytest.approx(0.75, rel=1e-5)
    # an invalid pair (a tie) adds 0 but still counts in the mean over pairs
    loss_tie, m = dpo_loss(err, err_ref, winners, losers, torch.tensor([True, False]), beta=100.0)
    assert loss_tie.item() == pytest.approx(float(-torch.nn.functional.logsigmoid(z[0]) / 2), rel=1e-5)
    assert m["dpo_valid_fraction"].item() == 0.5
    assert m["dpo_accuracy"].item() == 0.5  # of both pairs: the tie does not count as won


def test_dpo_loss_gradient_lowers_the_winners_error_and_raises_the_losers():
    err = torch.tensor([1.0, 1.0], requires_grad=True)
    loss, _ = dpo_loss(err, torch.tensor([1.0, 1.0]), torch.tensor([0]), torch.tensor([1]), torch.tensor([True]), 10.0)
    loss.backward()
    # d/d err_w of -log sigmoid(-(b/2)(err_w - err_l)) at z = 0: (b/2) * sigmoid(-z) = 2.5; the loser's: -2.5
    assert err.grad.tolist() == pytest.approx([2.5, -2.5])


def test_dpo_geometry_trains_one_pair_per_group(tmp_path):
    cfg = tiny_config(tmp_path, "dpo", ["train.per_device_batch_size=2"])
    geo = cfg.geometry(1)  # 4 groups of 8, rollouts in micro-batches of 2, pairs in micro-batches of 2 pairs
    assert (geo.batches_per_rank, geo.train_samples_per_rank, geo.train_micro_batch, geo.train_batches_per_rank,
            geo.batches_per_grad_step) == (16, 8, 4, 2, 1)
    assert cfg.train.uses_reference and cfg.train.kl_beta == 0.0
    geo = tiny_config(tmp_path, "dpo", ["train.gradient_step_per_epoch=1"]).geometry(1)
    assert (geo.train_micro_batch, geo.train_batches_per_rank) == (8, 1)  # min(2 x 16, 8)
    with pytest.raises(ConfigError, match="dpo trains each group's .best, worst. pair, 4 pairs per process"):
        tiny_config(tmp_path, "dpo").geometry(1)  # 1 micro-batch of 4 pairs cannot make 2 optimizer steps
    # a config valid on 8 processes trains there: the LR schedule's length needs no 1-process geometry
    from trainer.loop import schedule_steps

    eight = tiny_config(tmp_path, "dpo", ["train.group_size=6", "train.unique_sample_num_per_epoch=8",
                                          "train.per_device_batch_size=3", "train.gradient_step_per_epoch=1"])
    assert eight.geometry(8).train_batches_per_rank == 1
    with pytest.raises(ConfigError):
        eight.geometry(1)  # 8 pairs in micro-batches of 3: not on one process
    assert schedule_steps(eight) == 2  # max_epochs x 1
    grpo = tiny_config(tmp_path, "grpo").geometry(1)  # everything else trains every sample
    assert (grpo.train_samples_per_rank, grpo.train_micro_batch, grpo.train_batches_per_rank) == (32, 16, 2)


def test_train_order_puts_each_groups_winner_beside_its_loser(tmp_path):
    from trainer.algorithms import ALGORITHMS
    from trainer.collect import EpochData

    cfg = tiny_config(tmp_path, "dpo", ["train.per_device_batch_size=2"])
    dpo = ALGORITHMS.get("dpo")(cfg)
    g = torch.Generator().manual_seed(0)
    advantages = torch.randn(32, generator=g)
    group_ids = torch.arange(4).repeat_interleave(8)[torch.randperm(32, generator=g)]
    data = EpochData(prompts=[""] * 32, group_ids=group_ids, cond=None, rollout=None, rewards={},
                     advantages=advantages, metrics={})
    order = dpo.train_order(data, torch.Generator().manual_seed(1))
    assert order.shape == (8,)
    pairs = order.view(4, 2)
    assert sorted(group_ids[pairs[:, 0]].tolist()) == [0, 1, 2, 3]
    for w, l in pairs.tolist():
        members = advantages[group_ids == group_ids[w]]
        assert group_ids[w] == group_ids[l]
        assert advantages[w] == members.max() and advantages[l] == members.min()


def test_dpo_full_fine_tuning_keeps_a_frozen_reference_without_kl(tmp_path):
    from trainer.loop import train

    cfg = tiny_config(tmp_path, "dpo", ["model.finetune_type=full", "train.learning_rate=1e-4",
                                        "train.per_device_batch_size=2", "train.max_epochs=1"])
    summary = train(cfg, quiet=True)
    assert summary["optimizer_steps"] == 2


def test_the_preference_reference_is_the_starting_policy_even_with_a_guided_kl_anchor(tmp_path, monkeypatch):
    """train.ref_guidance_scale moves the KL anchor to the base's guided velocity; dpo's implicit reward still
    compares the policy with the base at the policy's own CFG, so before any update every pair's z is 0."""
    from trainer import loop

    seen = {}
    real = loop.optimize

    def spy(*args, **kwargs):
        step, metrics = real(*args, **kwargs)
        seen.setdefault("first", metrics)
        return step, metrics

    monkeypatch.setattr(loop, "optimize", spy)
    cfg = tiny_config(tmp_path, "dpo", ["train.per_device_batch_size=2", "train.gradient_step_per_epoch=1",
                                        "train.max_epochs=1", "train.kl_beta=0.1", "train.ref_guidance_scale=4.5"])
    loop.train(cfg, quiet=True)
    first = seen["first"]  # one optimizer step at the end of the epoch: every micro-batch saw the initial weights
    assert first["train/dpo_margin"] == 0.0 and first["train/loss"] > 0
    assert first["train/kl"] > 0  # while the KL term does see the guided anchor
