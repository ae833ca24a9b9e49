"""GRPO-Guard (Wang et al. 2025): Flow-GRPO with a normalized ratio and per-step reweighting.

* RatioNorm: the importance ratio is ``exp(mean_d eps * (mu_theta - mu_old))`` with ``eps``
  the realized rollout noise, i.e. the always-negative ``-||dmu||^2 / (2 s^2)`` term of the
  plain log-ratio is removed and the log-ratio is rescaled by the step std ``s``; it needs
  the rollout's Gaussian means, which the sampler records for this algorithm.
* The policy loss of each step is divided by ``|dt|`` so steps contribute comparable gradients.
Requires Flow-SDE (checked at config time). Differences from the official code (flow_grpo
``train_sd3_GRPO_Guard.py``): the ratio is computed directly from the noise instead of via
log-probs (identical in exact arithmetic; tested), and the std is per sample, not a batch mean.
"""

from __future__ import annotations

from trainer.algorithms.base import ALGORITHMS
from trainer.algorithms.grpo import GRPO
from trainer.algorithms.losses import (clip_advantages, clipped_surrogate, guard_log_ratio,
                                       guard_loss_scale)


@ALGORITHMS.register("grpo-guard")
class GRPOGuard(GRPO):
    keep_means = True

    def surrogate(self, batch, unit, out, sigma, sigma_next, v=None, x=None):
        log_ratio = guard_log_ratio(out.mean, batch.means[:, unit], batch.next_latents[:, unit],
                                    batch.stds[:, unit])
        adv = clip_advantages(batch.advantages, self.t.adv_clip_range)
        loss, metrics = clipped_surrogate(log_ratio.exp(), adv, self.t.clip_range)
        return loss * guard_loss_scale(sigma - sigma_next), metrics
