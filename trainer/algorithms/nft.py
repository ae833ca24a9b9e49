"""DiffusionNFT (Zheng et al. 2025): negative-aware fine-tuning on the forward process.

With the frozen sampling policy ``v_old`` and the trainable ``v_theta`` it forms the implicit
positive / negative policies ``v+ = (1-b) v_old + b v_theta``, ``v- = (1+b) v_old - b v_theta``
and regresses ``v+`` on positively- and ``v-`` on negatively-rewarded samples, weighted by the
optimality probability ``r = clip(A)/(2c) + 1/2`` (adaptive x0-space weighting as the code).
How this differs from the official code (NVlabs/DiffusionNFT):
* one EMA serves as the off-policy "old" model and as the eval EMA (the official code keeps
  an "old" adapter and a separate eval EMA); its default schedule is the paper's
  ``eta_i = min(0.001 i, 0.5)`` (``piecewise_linear``), and like the official old adapter it moves
  once an epoch, after the epoch's last optimizer step (trainer.loop.optimize);
* every sample draws its own training timesteps; ``kl_beta`` is the paper's ``beta`` on
  ``||v_theta - v_ref||^2`` (1e-4 by default).
"""

from __future__ import annotations

from trainer.algorithms.base import ALGORITHMS
from trainer.algorithms.decoupled import Decoupled
from trainer.algorithms.losses import nft_loss, nft_optimality


@ALGORITHMS.register("nft")
class NFT(Decoupled):
    def prepare(self, batch, policy):
        state = self.noised(batch)
        state["v_old"] = [policy.old_velocity(state["x_t"][j], state["sigma"][j], batch.cond)
                          for j in range(state["sigma"].shape[0])]
        return state

    def loss(self, batch, unit, state, policy):
        t = self.t
        x_t, sigma = state["x_t"][unit], state["sigma"][unit]
        v = policy.velocity(x_t, sigma, batch.cond)
        r = nft_optimality(batch.advantages, t.adv_clip_range)
        loss, metrics = nft_loss(v, state["v_old"][unit], x_t, batch.final_latents.float(), sigma,
                                 r, t.nft_beta, t.adv_clip_range)
        return self.with_kl(loss, metrics, v, batch, state, unit, policy)
