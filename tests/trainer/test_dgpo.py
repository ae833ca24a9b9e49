"""DGPO (``train.trainer_type: dgpo``): the loss against closed forms, whole groups per training
micro-batch, and rollouts that move to the EMA after ``train.sample_from_ema_after`` steps."""

from __future__ import annotations

import pytest
import torch

from shared.config import ConfigError
from tests.helpers.tiny import tiny_config
from trainer.algorithms.losses import dgpo_loss


def test_dgpo_loss_closed_form_and_gradient():
    dsm = torch.tensor([1.0, 2.0, 0.5, 0.7], requires_grad=True)
    ref = torch.tensor([1.5, 1.0, 0.5, 1.0])
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    gid = torch.tensor([7, 7, 3, 3])
    loss, m = dgpo_loss(dsm, ref, adv, gid, beta=10.0, group_size=2)
    # group 7: sum A beta (l - l_ref) / K = (1 * 10 * -0.5 + -1 * 10 * 1.0) / 2 = -7.5
    # group 3: (2 * 10 * 0 + -2 * 10 * -0.3) / 2 = 3.0
    w = torch.sigmoid(torch.tensor([-7.5, -7.5, 3.0, 3.0]))
    assert loss.item() == pytest.approx(float((w * adv * dsm.detach()).mean()), rel=1e-6)
    assert m["dgpo_group_weight"].item() == pytest.approx(float(w.mean()), rel=1e-6)
    loss.backward()
    assert dsm.grad.tolist() == pytest.approx((w * adv / 4).tolist(), rel=1e-6)  # the weight is detached


def test_dgpo_clip_detaches_samples_past_the_trust_region():
    dsm = torch.tensor([0.9, 1.1, 1.0, 1.0], requires_grad=True)
    old = torch.ones(4)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    gid = torch.tensor([0, 0, 1, 1])
    # ratio exp(old - dsm): e^0.1 > 1 + 0.05 for the positive sample 0 (already improved: clipped),
    # e^-0.1 < 1 - 0.05 for the negative sample 1 (already worsened: clipped); 2 and 3 unchanged
    loss, m = dgpo_loss(dsm, old.clone(), adv, gid, beta=1.0, group_size=2, old_dsm=old, clip_range=0.05)
    loss.backward()
    assert m["clip_fraction"].item() == 0.5
    assert dsm.grad[0] == 0 and dsm.grad[1] == 0 and dsm.grad[2] != 0 and dsm.grad[3] != 0


def test_dgpo_geometry_keeps_groups_whole(tmp_path):
    geo = tiny_config(tmp_path, "dgpo").geometry(1)  # K 8, M 4, B 16: 2 groups a micro-batch
    assert (geo.train_micro_batch, geo.train_batches_per_rank, geo.batches_per_grad_step) == (16, 2, 1)
    geo = tiny_config(tmp_path, "dgpo", ["train.per_device_batch_size=4"]).geometry(1)  # B < K: one whole group
    assert (geo.train_micro_batch, geo.train_batches_per_rank, geo.batches_per_grad_step) == (8, 4, 2)
    with pytest.raises(ConfigError, match="dgpo trains whole groups"):
        tiny_config(tmp_path, "dgpo", ["train.per_device_batch_size=32", "train.gradient_step_per_epoch=2"]
                    ).geometry(1)  # 4 groups a micro-batch: 1 micro-batch for 2 optimizer steps
    cfg = tiny_config(tmp_path, "dgpo")
    assert cfg.train.uses_reference and cfg.train.sample_from_ema_after == 200


def test_train_order_keeps_groups_contiguous(tmp_path):
    from trainer.algorithms import ALGORITHMS
    from trainer.collect import EpochData

    dgpo = ALGORITHMS.get("dgpo")(tiny_config(tmp_path, "dgpo"))
    g = torch.Generator().manual_seed(0)
    group_ids = torch.arange(10, 14).repeat_interleave(8)[torch.randperm(32, generator=g)]
    data = EpochData(prompts=[""] * 32, group_ids=group_ids, cond=None, rollout=None, rewards={},
                     advantages=torch.zeros(32), metrics={})
    order = dgpo.train_order(data, torch.Generator().manual_seed(1))
    assert sorted(order.tolist()) == list(range(32))
    runs = group_ids[order].view(4, 8)
    assert all(len(set(row.tolist())) == 1 for row in runs) and len(set(runs[:, 0].tolist())) == 4


def test_rollouts_move_to_the_ema_after_sample_from_ema_after_steps(tmp_path, monkeypatch):
    from trainer import loop
    from trainer.policy import Policy

    seen = []
    real = Policy.sampling_module

    def spy(self):
        seen.append((self.optimizer_step, self.samples_from_ema()))
        return real(self)

    monkeypatch.setattr(Policy, "sampling_module", spy)
    cfg = tiny_config(tmp_path, "dgpo", ["train.sample_from_ema_after=2", "train.max_epochs=3",
                                         "train.dgpo_clip=false"])
    loop.train(cfg, quiet=True)
    # 2 optimizer steps an epoch: epoch 0 samples at step 0 (current weights), epochs 1 and 2 at 2 and 4 (EMA)
    assert [s for s in seen] == [(0, False), (2, True), (4, True)]
    with pytest.raises(ConfigError, match="sample_from_ema_after: 2 samples from the EMA"):
        tiny_config(tmp_path, "dgpo", ["train.sample_from_ema_after=2", "train.ema_decay=0"])
