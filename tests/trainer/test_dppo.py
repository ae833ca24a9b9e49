"""Flow-DPPO (``trainer_type: dppo``): the trust-region divergence and the masked surrogate against
closed forms, the velocity gap recovered from step means for every dynamics, the config's defaults,
and a real epoch's metrics."""

from __future__ import annotations

import math

import pytest
import torch

from shared.config import ConfigError
from shared.flow import sde_step
from tests.helpers.tiny import tiny_config
from trainer.algorithms.dppo import step_gain
from trainer.algorithms.losses import dppo_surrogate, gaussian_step_kl, mean_d


def test_gaussian_step_kl_closed_form():
    mean_old = torch.randn(3, 2, 4, 4)
    shift = torch.tensor([0.1, 0.2, 0.0]).view(3, 1, 1, 1)
    std = torch.tensor([0.5, 0.1, 0.3])
    got = gaussian_step_kl(mean_old + shift, mean_old, std)
    torch.testing.assert_close(got, torch.tensor([0.01 / 0.5, 0.04 / 0.02, 0.0]), rtol=1e-5, atol=1e-7)
    assert gaussian_step_kl(mean_old + 0.1, mean_old, 0.5).shape == (3,)


def test_dppo_surrogate_masks_only_samples_pushed_out_of_the_trust_region():
    #                  in region, pushed | out, pushed up | out, pushed down | out, against A | out, A = 0
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.2], requires_grad=True)
    adv = torch.tensor([1.0, 2.0, -1.0, 1.0, 0.0])
    kl_old = torch.tensor([1e-7, 1e-3, 1e-3, 1e-3, 1e-3])
    loss, metrics = dppo_surrogate(ratio, adv, kl_old, threshold=1e-6)
    keep = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(loss, (keep * -adv * ratio.detach()).mean())
    loss.backward()
    torch.testing.assert_close(ratio.grad, keep * -adv / 5)  # no gradient where masked
    assert metrics["masked_frac"].item() == pytest.approx(0.4) and metrics["outside_frac"].item() == pytest.approx(0.8)
    # no sample outside: the plain policy gradient -A r, whatever the ratios
    loss, metrics = dppo_surrogate(ratio.detach(), adv, torch.zeros(5), threshold=1e-6)
    assert loss.item() == pytest.approx((-adv * ratio.detach()).mean().item()) and metrics["masked_frac"] == 0
    with pytest.raises(ValueError, match="shape mismatch"):
        dppo_surrogate(ratio, adv[:3], kl_old, 1e-6)


@pytest.mark.parametrize("dynamics, noise_level", [("Flow-SDE", 0.7), ("Dance-SDE", 0.3), ("CPS", 0.8)])
def test_the_velocity_gap_is_recovered_from_the_step_means(dynamics, noise_level):
    """The step mean is affine in v, so (mu_new - mu_old) / gain = v_new - v_old exactly."""
    g = torch.Generator().manual_seed(0)
    x, v_old, v_new = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sigma, sigma_next = torch.full((2,), 0.7), torch.full((2,), 0.55)

    def mean(v):
        return sde_step(x, v, sigma, sigma_next, dynamics=dynamics, noise_level=noise_level, prev_sample=x).mean

    gain = step_gain(x, sigma, sigma_next, dynamics, noise_level)
    torch.testing.assert_close((mean(v_new) - mean(v_old)) / gain, v_new - v_old, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean_d(((mean(v_new) - mean(v_old)) / gain) ** 2), mean_d((v_new - v_old) ** 2),
                               rtol=1e-4, atol=1e-6)


def test_dppo_config_defaults_and_refusals(tmp_path):
    t = tiny_config(tmp_path, "dppo").train
    assert (t.dynamics_type, t.kl_mask_type, t.kl_mask_threshold, t.kl_beta, t.adv_clip_range) == (
        "Flow-SDE", "x-based", 1e-6, 0.0, 5.0)
    with pytest.raises(ConfigError, match="per-step log-probabilities"):
        tiny_config(tmp_path, "dppo", ["train.dynamics_type=ODE"])
    with pytest.raises(ConfigError, match="kl_mask_threshold"):
        tiny_config(tmp_path, "dppo", ["train.kl_mask_threshold=0"])
    with pytest.raises(ConfigError, match="kl_mask_type"):
        tiny_config(tmp_path, "dppo", ["train.kl_mask_type=w-based"])


@pytest.mark.parametrize("mask_type", ["x-based", "v-based"])
def test_an_epoch_trains_and_reports_the_trust_region(tmp_path, mask_type):
    from trainer.loop import train

    cfg = tiny_config(tmp_path, "dppo", ["train.max_epochs=2", f"train.kl_mask_type={mask_type}",
                                         "train.kl_mask_threshold=1e-9", "train.learning_rate=1e-2"])
    train(cfg, quiet=True)
    import json
    rows = [json.loads(line) for line in (tmp_path / "runs").rglob("metrics.jsonl").__next__().read_text().splitlines()]
    trained = [r for r in rows if "train/masked_frac" in r]
    assert trained and all(0 <= r["train/masked_frac"] <= 1 and math.isfinite(r["train/kl_old"]) for r in trained)
    # two optimizer steps an epoch: the first step's micro-batches replay the rollout's own weights
    # (divergence exactly 0, inside even this tiny region), the second's have moved past it
    assert all(r["train/outside_frac"] == 0.5 and r["train/kl_old"] > 0 for r in trained)
    assert 0 < trained[0]["train/masked_frac"] <= 0.5
