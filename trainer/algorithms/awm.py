"""AWM, Advantage Weighted Matching (Xue et al. 2025): the pretraining flow-matching loss,
weighted by the advantage, in a PPO-clipped ratio form.

``logp = -w(t, ||v_theta - (eps - x0)||^2)`` with weightings Uniform, t, t**2, huber, ghuber;
``ratio = exp(logp - logp_old)`` where ``logp_old`` is evaluated under the sampling policy at
the start of the micro-batch (ratio = 1 on-policy, so the gradient is exactly the
advantage-weighted flow-matching gradient), plus ``kl_beta ||v - v_ref||^2`` and the
TRPO-like anchor ``ema_kl_beta ||v - v_ema||^2``.
How this differs from the official code (scxue/advantage_weighted_matching):
* advantages are clamped to ``adv_clip_range`` but not rescaled afterwards (the official code
  divides by 5 after clamping, i.e. a 5x smaller effective learning rate);
* the anchor EMA is updated per optimizer step (official: once per epoch, one step per epoch
  there, so identical at their settings) and doubles as the eval EMA.
"""

from __future__ import annotations

from trainer.algorithms.base import ALGORITHMS
from trainer.algorithms.decoupled import Decoupled
from trainer.algorithms.losses import (awm_log_prob, clip_advantages, clipped_surrogate,
                                       kl_v_based, policy_ratio)


@ALGORITHMS.register("awm")
class AWM(Decoupled):
    def prepare(self, batch, policy):
        state = self.noised(batch)
        t = self.t
        state["logp_old"] = [
            awm_log_prob(policy.old_velocity(state["x_t"][j], state["sigma"][j], batch.cond),
                         self.target(batch, state, j), state["sigma"][j], t.awm_weighting,
                         t.ghuber_power)
            for j in range(state["sigma"].shape[0])
        ]
        return state

    def loss(self, batch, unit, state, policy):
        t = self.t
        x_t, sigma = state["x_t"][unit], state["sigma"][unit]
        v = policy.velocity(x_t, sigma, batch.cond)
        logp = awm_log_prob(v, self.target(batch, state, unit), sigma, t.awm_weighting,
                            t.ghuber_power)
        adv = clip_advantages(batch.advantages, t.adv_clip_range)
        loss, metrics = clipped_surrogate(policy_ratio(logp, state["logp_old"][unit]).float(),
                                          adv, t.clip_range)
        loss, metrics = self.with_kl(loss, metrics, v, batch, state, unit, policy)
        if t.ema_kl_beta and policy.ema is not None:
            ema_kl = kl_v_based(v, policy.ema_velocity(x_t, sigma, batch.cond)).mean()
            loss = loss + t.ema_kl_beta * ema_kl
            metrics["ema_kl"] = ema_kl.detach()
        return loss, metrics
