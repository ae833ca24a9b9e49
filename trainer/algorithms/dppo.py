"""Flow-DPPO (Flow-Factory's ``dppo`` trainer): GRPO whose PPO ratio clip is replaced by a trust
region on the exact divergence of the per-step Gaussian policies.

Rollouts, advantages, trained steps and the optional KL to the reference are GRPO's. Per replayed
step the loss is ``-A r`` (no clip), except that a sample whose step has left the trust region
(``KL(pi_theta || pi_old) >= train.kl_mask_threshold``) and whose ratio already moved the way its
advantage pushes gets no gradient (:func:`~trainer.algorithms.losses.dppo_surrogate`). The
divergence is measured

* ``kl_mask_type: x-based`` (default): between the next-step Gaussians, ``mean_d (mu - mu_old)^2 /
  (2 s^2)`` with ``mu_old`` the rollout's mean, which the sampler records for this algorithm;
* ``kl_mask_type: v-based``: between the velocities, ``mean_d (v - v_old)^2``. The step mean is
  affine in the velocity, ``mu = a + g v`` (every dynamics), so ``v - v_old = (mu - mu_old) / g``
  with the gain ``g`` of the step: the rollout's velocity need not be stored.

``train.clip_range`` plays no part. ``train.ref_guidance_scale`` is Flow-Factory's
``kl_guidance_scale`` (the CFG of the KL reference).
"""

from __future__ import annotations

import torch

from shared.flow import sde_step
from trainer.algorithms.base import ALGORITHMS
from trainer.algorithms.grpo import GRPO
from trainer.algorithms.losses import (clip_advantages, dppo_surrogate, gaussian_step_kl, mean_d,
                                       policy_ratio)


def step_gain(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, dynamics: str,
              noise_level: float) -> torch.Tensor:
    """``d mu / d v`` of one step, elementwise like ``x`` (float32): the step mean is affine in the
    velocity for every dynamics, so it is the mean at ``v = 1`` minus the mean at ``v = 0``."""
    def mean(v: torch.Tensor) -> torch.Tensor:
        return sde_step(x, v, sigma, sigma_next, dynamics=dynamics, noise_level=noise_level, prev_sample=x,
                        check_sigmas=False).mean
    return mean(torch.ones_like(x)) - mean(torch.zeros_like(x))


@ALGORITHMS.register("dppo")
class DPPO(GRPO):
    keep_means = True

    def surrogate(self, batch, unit, out, sigma, sigma_next, v=None, x=None):
        t = self.t
        if batch.means is None:
            raise ValueError("dppo compares each replayed step with the rollout's step mean, but these trajectories "
                             "carry none (sampled for another algorithm, or by a sampler that predates dppo). Fix: "
                             "sample with trainer_type dppo, whose rollouts record the means (keep_means)")
        mean_old = batch.means[:, unit]
        if t.kl_mask_type == "v-based":
            with torch.no_grad():
                gain = step_gain(x, sigma, sigma_next, t.dynamics_type, t.noise_level)
                kl_old = mean_d(((out.mean.detach() - mean_old.float()) / gain) ** 2)
        else:
            kl_old = gaussian_step_kl(out.mean.detach(), mean_old, out.std)
        ratio = policy_ratio(out.log_prob, batch.log_probs[:, unit])
        adv = clip_advantages(batch.advantages, t.adv_clip_range)
        return dppo_surrogate(ratio, adv, kl_old, t.kl_mask_threshold)
