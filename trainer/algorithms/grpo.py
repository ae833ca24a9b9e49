"""Flow-GRPO (Liu et al. 2025): PPO-clip on per-step Gaussian log-probs of an SDE rollout.

How this differs from the paper / flow_grpo code:
* the step math is any of Flow-SDE (the paper), Dance-SDE or CPS (``train.dynamics_type``);
* the log-prob is a per-element mean by default like flow_grpo (``log_prob_reduction: sum``
  gives the true joint density; clip ranges must then be re-tuned);
* the x-based KL is flow_grpo's code version ``mean_d (mu - mu_ref)^2 / (2 sigma_t^2)`` (the
  paper's closed form has an extra ``1/|dt|``); ``kl_type: v-based`` uses ``mean_d (v - v_ref)^2``;
* trained steps come from ``train.train_steps`` / ``num_train_steps`` (all but the last by
  default, as the paper; a subset gives the MixGRPO / Flow-GRPO-Fast window);
* zero-advantage samples are kept (their loss is zero) instead of being re-sampled;
* ``train.kl_gate`` (GARDO, :mod:`trainer.kl_gate`): the KL term is the mean over each micro-batch's
  gated samples only, against a resettable copy of the policy (the ``kl_reference`` snapshot) instead of
  the base;
* ``train.noise_aware_weighting`` multiplies each step's policy term by TempFlow-GRPO's noise-aware
  weight (with ``shared_initial_noise`` and one SDE step per epoch this is TempFlow-GRPO's
  branching: a group shares its ODE prefix, which rollouts compute once, and differs only by that
  step's noise).
"""

from __future__ import annotations

import torch

from shared.flow import sde_step
from shared.flow.sde import check_sigma_grid, noise_aware_weights
from trainer.algorithms.base import ALGORITHMS, Algorithm, TrainBatch, expand
from trainer.algorithms.losses import (clip_advantages, clipped_surrogate, kl_v_based,
                                       kl_x_based, policy_ratio)
from trainer.kl_gate import KL_REFERENCE


@ALGORITHMS.register("grpo")
class GRPO(Algorithm):
    needs_log_probs = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if self.t.kl_gate is not None:  # GARDO: the KL anchors to a copy of the policy, reset now and then
            self.snapshots = (KL_REFERENCE,)

    def num_units(self, num_sde_steps: int) -> int:
        return num_sde_steps

    def prepare(self, batch: TrainBatch, policy) -> dict:
        """Check the rollout's sigma grid on the host copy (read back once per epoch): the replayed
        steps then read nothing back per unit."""
        grid = self.host_sigmas(batch)
        check_sigma_grid(grid, batch.sde_steps, self.t.dynamics_type)
        if self.t.kl_gate is not None and self.t.kl_beta:  # the anchor's view, once per micro-batch
            self._anchor = policy.snapshot_view(KL_REFERENCE)
        if self.t.noise_aware_weighting:  # one weight per step of the grid, host floats
            return {"step_weights": noise_aware_weights(grid, self.t.dynamics_type, self.t.noise_level).tolist()}
        return {}

    def replay(self, batch: TrainBatch, unit: int, policy):
        """Recompute step ``unit`` under the current weights: (StepOutput, v, x, sigma, sigma_next)."""
        t, B = self.t, batch.size
        i = batch.sde_steps[unit]
        sigma, sigma_next = expand(batch.sigmas[i], B), expand(batch.sigmas[i + 1], B)
        x = batch.latents[:, unit]
        v = policy.velocity(x, sigma, batch.cond)
        out = sde_step(x, v, sigma, sigma_next, dynamics=t.dynamics_type,
                       noise_level=t.noise_level, prev_sample=batch.next_latents[:, unit],
                       log_prob_reduction=t.log_prob_reduction, check_sigmas=False)  # prepare() checked
        return out, v, x, sigma, sigma_next

    def kl(self, batch, unit, policy, out, v, x, sigma, sigma_next) -> torch.Tensor:
        t = self.t
        if t.kl_gate is not None:  # the resettable copy of the policy (trainer/kl_gate.py)
            with torch.no_grad():
                anchor = getattr(self, "_anchor", None)
                v_ref = policy.adapter.velocity(x, sigma, batch.cond, policy.ref_guidance_scale,
                                                transformer=anchor if anchor is not None
                                                else policy.snapshot_view(KL_REFERENCE))
        else:
            v_ref = policy.ref_velocity(x, sigma, batch.cond)
        if t.kl_type == "v-based":
            return kl_v_based(v, v_ref)
        ref = sde_step(x, v_ref, sigma, sigma_next, dynamics=t.dynamics_type,
                       noise_level=t.noise_level, prev_sample=batch.next_latents[:, unit], check_sigmas=False)
        return kl_x_based(out.mean, ref.mean, out.std, sigma - sigma_next, t.dynamics_type)

    def surrogate(self, batch, unit, out, sigma, sigma_next, v=None, x=None):
        """The clipped policy-gradient term and its metrics for one replayed step (``v``, ``x``: the
        step's velocity and latent, for subclasses that need them)."""
        adv = clip_advantages(batch.advantages, self.t.adv_clip_range)
        ratio = policy_ratio(out.log_prob, batch.log_probs[:, unit])
        return clipped_surrogate(ratio, adv, self.t.clip_range)

    def loss(self, batch, unit, state, policy):
        out, v, x, sigma, sigma_next = self.replay(batch, unit, policy)
        loss, metrics = self.surrogate(batch, unit, out, sigma, sigma_next, v=v, x=x)
        metrics = {k: v_.detach() for k, v_ in metrics.items()}
        if "step_weights" in state:  # TempFlow-GRPO: the policy term only, not the KL
            weight = state["step_weights"][batch.sde_steps[unit]]
            loss = loss * weight
            metrics["step_weight"] = weight
        if self.t.kl_beta:
            kl = self.kl(batch, unit, policy, out, v, x, sigma, sigma_next)
            if batch.kl_gate is not None:  # GARDO: the micro-batch's gated samples' mean; none gated, no term
                gate = batch.kl_gate.to(kl.device)
                kl = torch.where(gate, kl, torch.zeros_like(kl)).sum() / gate.sum().clamp_min(1)
            else:
                kl = kl.mean()
            loss = loss + self.t.kl_beta * kl
            metrics["kl"] = kl.detach()
        return loss, metrics
