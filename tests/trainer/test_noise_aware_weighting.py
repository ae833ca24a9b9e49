"""``train.noise_aware_weighting``: TempFlow-GRPO's per-step weights ``w_t = s_t / mean_u s_u`` (``s_t``
the step's transition std), against closed forms, and in GRPO's loss: the policy term of step ``t``
is ``w_t`` times the unweighted one, the KL term is not weighted."""

from __future__ import annotations

import math

import pytest
import torch

from shared.config import ConfigError
from shared.flow import flow_sigmas
from shared.flow.sde import noise_aware_weights
from shared.models import load_adapter
from shared.sampling import rollout
from tests.helpers.tiny import tiny_config
from trainer.algorithms import ALGORITHMS, TrainBatch
from trainer.policy import Policy, attach_trainable

GRID = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])


def test_flow_sde_weights_are_its_stds_over_their_mean():
    a = 0.7
    # std_t = a sqrt(t / (1 - t)) sqrt(t - t_next); at t = 1 the denominator takes t_next (flow_grpo)
    s = [a * math.sqrt(1 / (1 - 0.75)) * 0.5, a * math.sqrt(0.75 / 0.25) * 0.5,
         a * math.sqrt(0.5 / 0.5) * 0.5, a * math.sqrt(0.25 / 0.75) * 0.5]
    expected = torch.tensor([x / (sum(s) / 4) for x in s])
    got = noise_aware_weights(GRID, "Flow-SDE", a)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert abs(float(got.mean()) - 1) < 1e-6
    assert got[0] > got[1] > got[2] > got[3]  # the noisy steps' small gradients get the larger weights


def test_dance_sde_on_a_uniform_grid_weighs_every_step_alike():
    torch.testing.assert_close(noise_aware_weights(flow_sigmas(10, 1.0), "Dance-SDE", 0.3), torch.ones(10))


def test_cps_weights_follow_the_next_sigma():
    got = noise_aware_weights(GRID, "CPS", 0.5)
    expected = torch.tensor([0.75, 0.5, 0.25, 0.0]) / (1.5 / 4)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dynamics, level", [("ODE", 0.7), ("Flow-SDE", 0.0)])
def test_no_weights_without_noise(dynamics, level):
    with pytest.raises(ValueError, match="stochastic"):
        noise_aware_weights(GRID, dynamics, level)


def test_grpo_weighs_each_steps_policy_term_and_not_the_kl(tmp_path):
    def loss_of(weighting: bool, kl: float):
        cfg = tiny_config(tmp_path, "grpo", [f"train.noise_aware_weighting={str(weighting).lower()}",
                                             f"train.kl_beta={kl}", "train.clip_range=10.0"])
        torch.manual_seed(0)
        adapter = load_adapter(cfg.model, device="cpu", seed=0)
        trainable = attach_trainable(adapter, cfg)
        policy = Policy(adapter, adapter.transformer, cfg, trainable)
        cond = adapter.encode_prompts(["a red circle", "a blue square"], cfg=False)
        sigmas = flow_sigmas(cfg.train.num_inference_steps, adapter.scheduler_shift)
        steps = list(range(cfg.train.num_inference_steps - 1))
        torch.manual_seed(0)
        roll = rollout(adapter, cond, [3, 4], resolution=(16, 16), sigmas=sigmas, guidance_scale=1.0,
                       dynamics=cfg.train.dynamics_type, noise_level=cfg.train.noise_level, sde_steps=steps,
                       log_prob_reduction="mean")
        with torch.no_grad():  # then the policy moves, so ratios and KL are not trivial
            for p in trainable.values():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        batch = TrainBatch(cond=cond, advantages=torch.tensor([1.0, -0.5]), final_latents=roll.final_latents,
                           sigmas=sigmas, sde_steps=roll.sde_steps, latents=roll.latents,
                           next_latents=roll.next_latents, log_probs=roll.log_probs, stds=roll.stds,
                           means=roll.means, seed=0)
        algo = ALGORITHMS.get("grpo")(cfg)
        state = algo.prepare(batch, policy)
        with torch.no_grad():
            return [algo.loss(batch, u, state, policy) for u in range(len(steps))], sigmas, cfg

    plain, sigmas, cfg = loss_of(False, 0.0)
    weighted, _, _ = loss_of(True, 0.0)
    w = noise_aware_weights(sigmas, cfg.train.dynamics_type, cfg.train.noise_level)
    assert float(w.max() - w.min()) > 0.1  # the grid's weights differ, so the test can tell
    for u, ((lp, _), (lw, mw)) in enumerate(zip(plain, weighted)):
        assert float(lp.abs()) > 0
        torch.testing.assert_close(lw, lp * w[u], rtol=1e-5, atol=0)
        assert mw["step_weight"] == pytest.approx(float(w[u]))
    # the KL term is added unweighted
    plain_kl, _, _ = loss_of(False, 0.5)
    weighted_kl, _, _ = loss_of(True, 0.5)
    for u in range(len(plain)):
        kl = plain_kl[u][1]["kl"]
        assert float(kl) > 0
        torch.testing.assert_close(weighted_kl[u][0], plain[u][0] * w[u] + 0.5 * kl, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("extra", [["train.trainer_type=nft"], ["train.trainer_type=awm"],
                                   ["train.trainer_type=grpo-guard"]])
def test_noise_aware_weighting_needs_grpo_with_noise(tmp_path, extra):
    with pytest.raises(ConfigError, match="noise_aware_weighting"):
        tiny_config(tmp_path, "grpo", ["train.noise_aware_weighting=true", *extra])
