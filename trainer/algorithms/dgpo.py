"""DGPO, Direct Group Preference Optimization, as Flow-Factory's ``dgpo`` trainer.

Every sample of a group is re-noised with the group's own timestep and noise (``x_t = (1 - t) x0 +
t eps``, :meth:`~trainer.algorithms.decoupled.Decoupled.group_noise`); the loss is the
advantage-weighted flow-matching loss ``w_g A_i ||v_theta - (eps - x0)||^2`` where each group's weight
``w_g = sigmoid(sum_i A_i dgpo_beta (l_i - l_ref_i) / K)`` compares the policy's fit with the frozen
reference's over the whole group (:func:`~trainer.algorithms.losses.dgpo_loss`), and, with
``train.dgpo_clip``, a sample whose ratio ``exp(l_old - l)`` to the sampling policy left ``clip_range``
on its advantage's side is detached. The reference is the base at the policy's own CFG scale
(``train.ref_guidance_scale`` moves only the KL term's anchor), always evaluated; the sampling policy is the
EMA after ``train.sample_from_ema_after`` optimizer steps (Flow-Factory's ``switch_ema_ref``, 200).
How this differs from Flow-Factory's ``trainers/dgpo.py``:
* training micro-batches hold whole groups (``max(1, per_device_batch_size // group_size)`` of them, on
  one process, :meth:`DGPO.train_order`); Flow-Factory's sampler spreads each group over the
  processes' micro-batches and all-reduces the group sums;
* the timestep and noise are per group; Flow-Factory draws one timestep per training timestep for
  every sample of an inner epoch, and one noise per group.
"""

from __future__ import annotations

from trainer.algorithms.base import ALGORITHMS
from trainer.algorithms.decoupled import Decoupled
from trainer.algorithms.losses import clip_advantages, dgpo_loss


@ALGORITHMS.register("dgpo")
class DGPO(Decoupled):
    def train_order(self, data, generator):
        return self.whole_groups_order(data, generator)

    def prepare(self, batch, policy):
        self.check_whole_groups(batch)
        state = self.noised(batch, shared=True)
        state["ref_dsm"] = self.flow_losses(policy.base_velocity, batch, state)
        state["old_dsm"] = self.flow_losses(policy.old_velocity, batch, state) if self.t.dgpo_clip else None
        return state

    def loss(self, batch, unit, state, policy):
        t = self.t
        v = policy.velocity(state["x_t"][unit], state["sigma"][unit], batch.cond)
        old = state["old_dsm"][unit] if state["old_dsm"] is not None else None
        loss, metrics = dgpo_loss(self.flow_loss(v, batch, state, unit), state["ref_dsm"][unit],
                                  clip_advantages(batch.advantages, t.adv_clip_range), batch.group_ids,
                                  t.dgpo_beta, t.group_size, old_dsm=old, clip_range=t.clip_range)
        return self.with_kl(loss, metrics, v, batch, state, unit, policy)
