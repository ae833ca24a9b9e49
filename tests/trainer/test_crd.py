"""CRD (``train.trainer_type: crd``): the implicit reward and the centred loss against closed forms,
the snapshot decays, the old and sampling snapshots (blended after every epoch, sampled from,
published, checkpointed), whole groups per micro-batch, and Flow-Factory's config keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.config import ConfigError, parse_snapshot_decay
from shared.models import ParamView, load_adapter
from tests.helpers.tiny import tiny_config
from trainer.algorithms import ALGORITHMS
from trainer.algorithms.crd import centering_weights, crd_loss, implicit_reward, normalized_advantages
from trainer.ema import snapshot_decay
from trainer.policy import Policy, attach_trainable


def test_normalized_advantages_map_the_clip_range_onto_0_1():
    adv = torch.tensor([-7.0, -5.0, 0.0, 2.5, 9.0])
    assert normalized_advantages(adv, 5.0).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0]
    assert normalized_advantages(torch.tensor([-2.0, 4.0]), (2.0, 4.0)).tolist() == [0.25, 1.0]
    # over the upper end, as Flow-Factory's max of its signed range: a wider lower side clamps at 0
    assert normalized_advantages(torch.tensor([-5.0, -2.5, 5.0]), (10.0, 5.0)).tolist() == [0.0, 0.25, 1.0]


def test_implicit_reward_closed_form_and_sign():
    target = torch.zeros(2, 3)
    v = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]], requires_grad=True)
    v_old = torch.tensor([[2.0, 2.0, 2.0], [1.0, 0.0, 0.0]])
    r = implicit_reward(v, v_old, target, adaptive=False)
    # -(mean (v - 0)^2 - mean (v_old - 0)^2): [-(1 - 4), -(4/3 - 1/3)]
    assert torch.allclose(r, torch.tensor([3.0, -1.0]))
    ra = implicit_reward(v, v_old, target, adaptive=True)
    # each error over its own mean |error|: w = [1, 2/3], w_old = [2, 1/3]
    assert torch.allclose(ra, torch.tensor([-(1.0 / 1 - 4.0 / 2), -((4 / 3) / (2 / 3) - (1 / 3) / (1 / 3))]))
    r.sum().backward()  # raising r moves v towards the target
    assert torch.allclose(v.grad, -2 * v.detach() / 3)


def test_crd_loss_uniform_mse_and_bce_closed_forms():
    r = torch.tensor([0.3, -0.1, 0.2, 0.0], requires_grad=True)
    a = torch.tensor([0.9, 0.1, 0.4, 0.6])
    gid = torch.tensor([7, 7, 3, 3])
    loss, m = crd_loss(r, a, a - 0.5, gid, beta=2.0)
    # group means: r (0.1, 0.1), a (0.5, 0.5)
    r_c, a_c = torch.tensor([0.2, -0.2, 0.1, -0.1]), torch.tensor([0.4, -0.4, -0.1, 0.1])
    assert loss.item() == pytest.approx(((2 * r_c - a_c) ** 2).mean().item(), rel=1e-6)
    assert m["crd_implicit_reward"].item() == pytest.approx(0.1)
    loss.backward()  # the group mean of r is detached: d/dr_i = 2 beta (beta r_c - a_c) / B
    assert torch.allclose(r.grad, 2 * 2.0 * (2 * r_c - a_c) / 4, atol=1e-6)
    bce, _ = crd_loss(r.detach(), a, a - 0.5, gid, beta=2.0, loss_type="bce")
    want = F.binary_cross_entropy_with_logits(2 * r_c, torch.sigmoid(a_c))
    assert bce.item() == pytest.approx(want.item(), rel=1e-6)
    # at beta r_c = a_c the loss is zero: the centred reward is distilled exactly
    zero, _ = crd_loss(a_c / 2.0, a, a - 0.5, gid, beta=2.0)
    assert zero.item() == pytest.approx(0.0, abs=1e-12)


def test_centering_weights_softmax_and_hard_pools():
    a = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.5, 0.5])
    raw = torch.tensor([2.0, -2.0, 0.0, 1.0, 0.0, 0.0])
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    plus, minus = centering_weights(a, raw, gid, temp=0.5)
    for p in (plus, minus):
        assert torch.allclose(torch.stack([p[:3].sum(), p[3:].sum()]), torch.ones(2))
    assert torch.allclose(plus[:3], torch.softmax(a[:3] / 0.5, 0)) and torch.allclose(minus[3:], torch.softmax(-a[3:] / 0.5, 0))
    pos, neg = centering_weights(a, raw, gid, temp=0)
    assert pos.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # the positive samples of each group
    # group 0's one negative sample; group 1 has none: the plain mean
    assert torch.allclose(neg, torch.tensor([0.0, 1.0, 0.0, 1 / 3, 1 / 3, 1 / 3]))
    (uniform,) = centering_weights(a, raw, gid, temp=-1)
    assert torch.allclose(uniform, torch.full((6,), 1 / 3))
    # two directions are averaged
    r = torch.randn(6)
    both, _ = crd_loss(r, a, raw, gid, beta=1.0, temp=0)
    one = [((r - (p * r).view(2, 3).sum(1).repeat_interleave(3)) - (a - (p * a).view(2, 3).sum(1).repeat_interleave(3))
            ).pow(2).mean() for p in (pos, neg)]
    assert both.item() == pytest.approx(((one[0] + one[1]) / 2).item(), rel=1e-5)


class _StubPolicy:
    """The velocities CRD.loss asks for: the policy's (a trainable tensor) and the reference's."""

    def __init__(self, v, v_ref):
        self.v, self.v_ref = v, v_ref

    def velocity(self, x, sigma, cond):
        return self.v

    def ref_velocity(self, x, sigma, cond):
        return self.v_ref


@pytest.mark.parametrize("adaptive_kl", [True, False])
def test_crd_loss_scale_and_reward_weighted_kl(tmp_path, adaptive_kl):
    from trainer.algorithms.base import TrainBatch

    cfg = tiny_config(tmp_path, "crd", ["train.kl_beta=0.5", "train.crd_beta=2.0", "train.adv_clip_range=4.0",
                                        f"train.crd_reward_adaptive_kl={str(adaptive_kl).lower()}"])
    crd = ALGORITHMS.get("crd")(cfg)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 2, 3, generator=g), torch.randn(1, 4, 2, 3, generator=g)
    v = torch.randn(4, 2, 3, generator=g, requires_grad=True)
    v_old, v_ref = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    adv, gid = torch.tensor([1.0, -1.0, 3.0, -3.0]), torch.tensor([0, 0, 1, 1])
    batch = TrainBatch(cond=None, advantages=adv, final_latents=x0, sigmas=None, sde_steps=[], latents=None,
                       next_latents=None, log_probs=None, stds=None, means=None, seed=0, group_ids=gid)
    state = {"x_t": torch.zeros(1, 4, 2, 3), "sigma": torch.zeros(1, 4), "eps": eps, "v_old": [v_old]}
    loss, metrics = crd.loss(batch, 0, state, _StubPolicy(v, v_ref))
    a = normalized_advantages(adv, 4.0)
    r = implicit_reward(v, v_old, eps[0] - x0, adaptive=True)
    kl = ((v - v_ref) ** 2).mean(dim=(1, 2))
    w = 2e-4 + a * (1 - 2e-4) if adaptive_kl else torch.ones(4)
    want = crd_loss(r, a, adv, gid, beta=2.0)[0] * 4.0 / 2.0 + 0.5 * (w * kl).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert metrics["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-6)  # the unweighted mean


def test_snapshot_decay_follows_the_start_value_slope_end_format(tmp_path):
    assert [snapshot_decay(s, "75-0.0-0.0075-0.999") for s in (0, 74, 75, 100)] == pytest.approx([0, 0, 0, 0.1875])
    assert snapshot_decay(10_000, "75-0.0-0.0075-0.999") == 0.999
    assert snapshot_decay(10, "0-0.25-0.005-0.999") == pytest.approx(0.3)
    assert snapshot_decay(3, "offline") == 1.0 and snapshot_decay(3, "none") == 0.0
    assert parse_snapshot_decay("medium") == (75, 0.0, 0.0075, 0.999)
    assert parse_snapshot_decay("2") == parse_snapshot_decay("medium")  # Flow-Factory's preset numbers
    for bad in ("0.5", "1-2-3", "0-1.5-0-1", "-1-0-0-0", "0-0-inf-1", "inf-0-0-0", "7"):
        with pytest.raises(ValueError, match="snapshot decay"):
            parse_snapshot_decay(bad)
    with pytest.raises(ConfigError, match="crd_old_decay"):
        tiny_config(tmp_path, "crd", ["train.crd_old_decay=fastest"])
    assert tiny_config(tmp_path, "crd", ["train.crd_sampling_decay=3"]).train.crd_sampling_decay == "3"


def test_crd_config_defaults_geometry_and_refusals(tmp_path):
    cfg = tiny_config(tmp_path, "crd")
    t = cfg.train
    assert (t.kl_beta, t.adv_clip_range, t.dynamics_type, t.crd_beta, t.crd_loss_type) == (0.1, 5.0, "ODE", 1.0, "mse")
    assert t.uses_reference
    # the base is needed only by a KL term or, without the old snapshot, as v_old
    assert not tiny_config(tmp_path, "crd", ["train.kl_beta=0"]).train.uses_reference
    assert tiny_config(tmp_path, "crd", ["train.kl_beta=0", "train.crd_use_old=false"]).train.uses_reference
    geo = tiny_config(tmp_path, "crd", ["train.per_device_batch_size=4"]).geometry(1)  # B < K: one whole group
    assert (geo.train_micro_batch, geo.train_batches_per_rank, geo.batches_per_grad_step) == (8, 4, 2)
    with pytest.raises(ConfigError, match="crd trains whole groups"):
        tiny_config(tmp_path, "crd", ["train.per_device_batch_size=32", "train.gradient_step_per_epoch=2"]).geometry(1)
    for refused in ("train.sample_from_ema_after=5", "train.off_policy=true"):
        with pytest.raises(ConfigError, match="own sampling snapshot"):
            tiny_config(tmp_path, "crd", [refused])
    with pytest.raises(ConfigError, match="weights .* invert"):
        tiny_config(tmp_path, "crd", ["train.kl_beta=5e-5"])
    assert tiny_config(tmp_path, "crd", ["train.kl_beta=5e-5", "train.crd_reward_adaptive_kl=false"])


def _policy(tmp_path, overrides=()):
    cfg = tiny_config(tmp_path, "crd", list(overrides))
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    algorithm = ALGORITHMS.get("crd")(cfg)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg), snapshots=algorithm.snapshots)
    return cfg, algorithm, policy


def test_after_epoch_blends_the_snapshots_and_rollouts_use_the_sampling_one(tmp_path):
    cfg, crd, policy = _policy(tmp_path, ["train.crd_old_decay=0-0.25-0.05-0.999",
                                          "train.crd_sampling_decay=2-1.0-0.0-0.0"])
    assert set(policy.snapshots) == {"old", "sampling"}
    start = {n: p.detach().clone() for n, p in policy.trainable.items()}
    with torch.no_grad():
        for p in policy.trainable.values():
            p.add_(1.0)
    metrics = crd.after_epoch(policy, step=2)
    assert metrics == pytest.approx({"train/crd_old_decay": 0.35, "train/crd_sampling_decay": 0.0})
    for n, p in policy.trainable.items():
        assert torch.allclose(policy.snapshots["old"].shadow[n], start[n] + 0.65)  # 0.35 s + 0.65 (s + 1)
        assert torch.equal(policy.snapshots["sampling"].shadow[n], p.detach())  # decay 0 after step 2: a copy
    # what rollouts run and what the trainer publishes is the sampling snapshot
    module = policy.sampling_module()
    assert isinstance(module, ParamView) and all(
        torch.equal(module._params[n], policy.snapshots["sampling"].shadow[n]) for n in policy.trainable)
    assert not torch.equal(policy.ema.shadow[next(iter(policy.trainable))], module._params[next(iter(policy.trainable))])
    assert all(torch.equal(policy.sampling_weights()[n], p.detach()) for n, p in policy.trainable.items())
    crd.after_epoch(policy, step=1)  # before step 2 the sampling decay is 1: the snapshot stays
    with torch.no_grad():
        for p in policy.trainable.values():
            p.add_(1.0)
    crd.after_epoch(policy, step=1)
    assert all(torch.allclose(policy.sampling_weights()[n], p.detach() - 1) for n, p in policy.trainable.items())
    _, crd_base, policy_base = _policy(tmp_path, ["train.crd_use_old=false"])
    assert set(policy_base.snapshots) == {"sampling"} and crd_base.snapshots == ("sampling",)


def test_a_frozen_sampling_snapshot_keeps_sampling_the_start(tmp_path, monkeypatch):
    """crd_sampling_decay 'offline' (decay 1): every epoch samples the starting weights while the
    policy trains, and the final checkpoint carries both snapshots."""
    from safetensors.torch import load_file

    from trainer import loop

    seen = []
    real = Policy.sampling_module

    def spy(self):
        module = real(self)
        seen.append({n: t.detach().clone() for n, t in module._params.items()})
        return module

    monkeypatch.setattr(Policy, "sampling_module", spy)
    cfg = tiny_config(tmp_path, "crd", ["train.max_epochs=3", "train.crd_sampling_decay=offline"])
    summary = loop.train(cfg, quiet=True)
    assert len(seen) == 3 and all(torch.equal(s[n], seen[0][n]) for s in seen for n in s)
    final = summary["run_dir"] + "/checkpoints/final"
    sampling, old = load_file(f"{final}/snapshot-sampling.safetensors"), load_file(f"{final}/snapshot-old.safetensors")
    assert sampling.keys() == old.keys() and all(torch.equal(sampling[n], seen[0][n].float()) for n in sampling)
    assert any(not torch.equal(old[n], sampling[n]) for n in old)  # the old model moved with the policy


def test_resume_without_the_snapshot_files_says_so(tmp_path):
    import os

    from trainer.loop import train

    cfg = tiny_config(tmp_path, "crd", ["train.max_epochs=2", "train.save_freq=1"])
    run = train(cfg, quiet=True)["run_dir"]
    ckpt = f"{run}/checkpoints/checkpoint-1"
    os.remove(f"{ckpt}/snapshot-old.safetensors")
    with pytest.raises(FileNotFoundError, match="snapshot-old.safetensors"):
        train(tiny_config(tmp_path, "crd", ["train.max_epochs=3", f"train.resume_from={ckpt}"]), quiet=True)


def test_a_full_fine_tune_without_kl_holds_no_copy_of_the_base(tmp_path):
    """crd compares with its old snapshot, so with kl_beta 0 nothing asks for the base: a full
    fine-tune keeps no reference copy (with crd_use_old false it does: v_old is the base's)."""
    full = ["model.finetune_type=full", "train.kl_beta=0"]
    assert _policy(tmp_path, full)[2]._ref is None
    assert _policy(tmp_path, full + ["train.crd_use_old=false"])[2]._ref is not None
