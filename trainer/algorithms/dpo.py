"""Online Diffusion-DPO (Wallace et al. 2024) on flow matching, as Flow-Factory's ``dpo`` trainer.

Each epoch's groups give one preference pair each: the sample with the highest advantage (the winner)
and the one with the lowest (the loser); the rest of the group is not trained (:meth:`DPO.train_order`).
A pair's two samples are re-noised with the same timestep and noise (``x_t = (1 - t) x0 + t eps``), the
policy's and the frozen reference's mean squared velocity errors against ``eps - x0`` are compared, and
the loss is ``-log sigmoid(-(dpo_beta / 2) [(err_w - ref_w) - (err_l - ref_l)])``
(:func:`~trainer.algorithms.losses.dpo_loss`): the policy fits the winner better and the loser worse than
the reference does. The reference is the base (LoRA disabled, or a frozen copy for full fine-tuning) at
the policy's own CFG scale (``train.ref_guidance_scale`` moves only the KL term's anchor), always
evaluated, whatever ``kl_beta`` says; with a LoRA ``model.init_from`` it is the base without that
LoRA (disabling the adapter drops both), so the loss starts below ``log 2`` where the warm start already
prefers the winners.
Micro-batches hold ``per_device_batch_size`` pairs, as Flow-Factory's (``BatchGeometry.train_micro_batch``).
How this differs from Flow-Factory's ``trainers/dpo.py``:
* the errors are against flow matching's velocity target ``eps - x0`` (the flow-matching form of
  Diffusion-DPO's noise-prediction loss); Flow-Factory's trainer compares its forward's ``noise_pred``
  with the noise ``eps``;
* pairs are formed per process from that process's whole groups (they never straddle processes here);
* a pair whose best and worst samples have equal rewards carries no preference: its loss term is 0
  (Flow-Factory trains it like any other pair).
"""

from __future__ import annotations

import torch

from trainer.algorithms.base import ALGORITHMS
from trainer.algorithms.decoupled import Decoupled
from trainer.algorithms.losses import best_worst_pairs, dpo_loss


@ALGORITHMS.register("dpo")
class DPO(Decoupled):
    def train_order(self, data, generator):
        """Each group's (winner, loser) rows side by side, the pairs in a seeded random order."""
        winners, losers, _ = best_worst_pairs(data.advantages, data.group_ids)
        pairs = torch.stack([winners, losers], 1)
        return pairs[torch.randperm(pairs.shape[0], generator=generator)].reshape(-1)

    def pairs(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The micro-batch's pairs; every group in it must be exactly one (winner, loser) pair."""
        sizes = self.group_sizes(batch)
        if any(n != 2 for n in sizes):
            raise ValueError(f"dpo: a training micro-batch must hold whole (winner, loser) pairs, got group sizes "
                             f"{sizes}; the loop cuts micro-batches of BatchGeometry.train_micro_batch "
                             f"from DPO.train_order, which keeps them whole")
        return best_worst_pairs(batch.advantages, batch.group_ids)

    def prepare(self, batch, policy):
        state = self.noised(batch, shared=True)
        state["pairs"] = self.pairs(batch)
        state["err_ref"] = self.flow_losses(policy.base_velocity, batch, state)
        return state

    def loss(self, batch, unit, state, policy):
        v = policy.velocity(state["x_t"][unit], state["sigma"][unit], batch.cond)
        loss, metrics = dpo_loss(self.flow_loss(v, batch, state, unit), state["err_ref"][unit], *state["pairs"],
                                 self.t.dpo_beta)
        return self.with_kl(loss, metrics, v, batch, state, unit, policy)
