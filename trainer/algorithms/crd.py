"""CRD, Centered Reward Distillation (arXiv 2603.14128), as Flow-Factory's ``crd`` trainer.

The policy's implicit reward of a clean rollout ``x0``, re-noised to ``x_t = (1 - t) x0 + t eps``, is
how much better than an "old" model it fits the flow-matching target ``v_t = eps - x0``
(:func:`implicit_reward`). Within each prompt group both that reward and the external advantage are
centred, and the centred implicit reward is regressed onto the centred advantage (:func:`crd_loss`):
the reward is distilled into the policy's likelihood up to each prompt's unknown constant, which
centring removes. A KL term to the frozen base (at ``train.ref_guidance_scale``, Flow-Factory's
``kl_cfg``) keeps it close, weighted per sample by its normalized advantage
(``train.crd_reward_adaptive_kl``).

Two snapshots of the trainable weights (:attr:`CRD.snapshots`, kept by the policy and checkpointed)
are blended towards the policy after every epoch, ``s <- d s + (1 - d) policy``, with decays
``d(step)`` from ``train.crd_old_decay`` and ``train.crd_sampling_decay``
(:func:`~trainer.ema.snapshot_decay`): ``old`` gives ``v_old`` (``train.crd_use_old``; else the
frozen base does), ``sampling`` draws the rollouts (on-policy while its decay is 0, Flow-Factory's
default until step 75).

How this differs from Flow-Factory's ``trainers/crd.py``:
* centring is over each prompt group (training micro-batches hold whole groups,
  ``max(1, per_device_batch_size // group_size)`` of them, :meth:`CRD.train_order`); Flow-Factory
  centres over the micro-batch gathered from every process, whatever prompts it holds;
* the timestep and noise are drawn per group (the group's samples compared at equal ``(t, eps)``);
  Flow-Factory shares a timestep over the micro-batch and draws noise per sample;
* ``crd_weight_temp: 0`` averages over the samples with a positive (negative) raw advantage;
  Flow-Factory compares the advantage already mapped to ``[0, 1]`` with 0, so its negative pool is
  always empty and falls back to the plain mean, and its positive one holds nearly every sample,
  weighted by ``softmax(a)`` at temperature 1;
* ``train.ref_param_device: cpu`` keeps the snapshots in host memory: each micro-batch copies the old
  one to the device once (Flow-Factory keeps its snapshots where ``ref_param_device`` says too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.algorithms.base import ALGORITHMS
from trainer.algorithms.decoupled import Decoupled
from trainer.algorithms.losses import _clip_pair, clip_advantages, group_index, group_sum, mean_d
from trainer.ema import snapshot_decay


def normalized_advantages(adv: Tensor, adv_clip_range: float | tuple[float, float]) -> Tensor:
    """``[B]`` advantages -> ``[B]`` in ``[0, 1]``: clipped to ``[-lo, hi]``, then ``A / hi / 2 + 0.5``, clamped
    (0.5 is an average sample; Flow-Factory's mapping, which divides by the range's upper end)."""
    _, hi = _clip_pair(adv_clip_range, "adv_clip_range")
    return (clip_advantages(adv.float(), adv_clip_range) / hi / 2 + 0.5).clamp(0, 1)


def implicit_reward(v: Tensor, v_old: Tensor, target: Tensor, adaptive: bool = True) -> Tensor:
    """CRD's implicit reward ``r = -mean_d((v - v_t)^2 / w - (v_old - v_t)^2 / w_old)`` (``[B]``).

    ``v [B, ...]`` the policy's velocity (with gradient), ``v_old`` the old model's, ``target`` the
    flow-matching target ``eps - x0``, all at the same ``x_t``. ``adaptive``: ``w = mean_d |v - v_t|`` and
    ``w_old = mean_d |v_old - v_t|`` (detached, at least 1e-5), so each sample's error is measured
    relative to its own scale; otherwise ``w = w_old = 1``. Positive where the policy fits ``x0`` better
    than the old model does.
    """
    v, v_old, target = v.float(), v_old.float().detach(), target.float()
    err, err_old = (v - target) ** 2, (v_old - target) ** 2
    if adaptive:
        shape = (-1,) + (1,) * (v.dim() - 1)
        w = mean_d((v.detach() - target).abs()).clamp(min=1e-5).view(shape)
        w_old = mean_d((v_old - target).abs()).clamp(min=1e-5).view(shape)
        err, err_old = err / w, err_old / w_old
    return -mean_d(err - err_old)


def centering_weights(adv01: Tensor, adv: Tensor, group_ids: Tensor, temp: float) -> list[Tensor]:
    """The weights ``p [B]`` (summing to 1 within each group) of the group means CRD centres with.

    ``temp < 0``: one direction, the plain mean. ``temp == 0``: two, the mean over the group's samples
    with a positive raw advantage ``adv``, and over those with a negative one (a group without any
    falls back to the plain mean). ``temp > 0``: two, ``softmax(adv01 / temp)`` and
    ``softmax(-adv01 / temp)`` within the group (``adv01`` the advantage in ``[0, 1]``).
    """
    inverse, groups = group_index(group_ids, adv01.device)
    ones = torch.ones_like(adv01)
    uniform = ones / group_sum(ones, inverse, groups)
    if temp < 0:
        return [uniform]
    if temp == 0:
        out = []
        for mask in (adv > 0, adv < 0):
            m = mask.to(adv01.dtype)
            count = group_sum(m, inverse, groups)
            out.append(torch.where(count > 0, m / count.clamp(min=1), uniform))
        return out
    out = []
    for sign in (1.0, -1.0):
        s = sign * adv01 / temp
        top = torch.full((groups,), -torch.inf, dtype=s.dtype, device=s.device)
        top = top.scatter_reduce(0, inverse, s, reduce="amax")[inverse]
        e = torch.exp(s - top)
        out.append(e / group_sum(e, inverse, groups))
    return out


def crd_loss(r: Tensor, adv01: Tensor, adv: Tensor, group_ids: Tensor, beta: float,
             loss_type: str = "mse", temp: float = -1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """CRD's centred reward-matching loss over whole groups (``[B]`` inputs, a scalar out).

    For each direction's weights ``p`` (:func:`centering_weights`), ``A_c = a - sum_g p a`` and
    ``r_c = r - sum_g p r`` (the group mean of ``r`` detached); ``mse``: ``mean (beta r_c - A_c)^2``;
    ``bce``: binary cross-entropy of logits ``beta r_c`` against targets ``sigmoid(A_c)``; the
    directions averaged. ``r`` is the implicit reward (with gradient), ``adv01`` the advantage in
    ``[0, 1]`` (:func:`normalized_advantages`), ``adv`` the raw one (for ``temp == 0``).

    Metrics: ``crd_implicit_reward`` (mean ``r``), ``crd_loss`` (the value returned).
    """
    if not (r.shape == adv01.shape == adv.shape == group_ids.shape) or r.dim() != 1:
        raise ValueError(f"r, adv01, adv and group_ids must all be [B], got {tuple(r.shape)}, "
                         f"{tuple(adv01.shape)}, {tuple(adv.shape)}, {tuple(group_ids.shape)}")
    if loss_type not in ("mse", "bce"):
        raise ValueError(f"crd loss_type must be 'mse' or 'bce', got {loss_type!r}")
    r, a = r.float(), adv01.float().detach()
    inverse, groups = group_index(group_ids, r.device)
    terms = []
    for p in centering_weights(a, adv.to(a.device), group_ids, temp):
        a_c = a - group_sum(p * a, inverse, groups)
        r_c = r - group_sum(p * r.detach(), inverse, groups)
        if loss_type == "mse":
            terms.append(((beta * r_c - a_c) ** 2).mean())
        else:
            terms.append(F.binary_cross_entropy_with_logits(beta * r_c, torch.sigmoid(a_c)))
    loss = torch.stack(terms).mean()
    return loss, {"crd_implicit_reward": r.detach().mean(), "crd_loss": loss.detach()}


@ALGORITHMS.register("crd")
class CRD(Decoupled):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.snapshots = ("old", "sampling") if self.t.crd_use_old else ("sampling",)

    def train_order(self, data, generator):
        return self.whole_groups_order(data, generator)

    def prepare(self, batch, policy):
        self.check_whole_groups(batch)
        state = self.noised(batch, shared=True)
        if self.t.crd_use_old:
            view = policy.snapshot_view("old")  # its weights cast and moved once per micro-batch

            def old(x, s, c):
                return policy.frozen_velocity(view, x, s, c)
        else:
            old = policy.base_velocity
        state["v_old"] = [old(state["x_t"][j], state["sigma"][j], batch.cond).float()
                          for j in range(state["sigma"].shape[0])]
        return state

    def loss(self, batch, unit, state, policy):
        t = self.t
        v = policy.velocity(state["x_t"][unit], state["sigma"][unit], batch.cond)
        r = implicit_reward(v, state["v_old"][unit], self.target(batch, state, unit), t.crd_adaptive_logp)
        a = normalized_advantages(batch.advantages, t.adv_clip_range)
        loss, metrics = crd_loss(r, a, batch.advantages.float(), batch.group_ids, t.crd_beta, t.crd_loss_type,
                                 t.crd_weight_temp)
        # Flow-Factory's scale: the advantages' clip bound over beta
        loss = loss * _clip_pair(t.adv_clip_range, "adv_clip_range")[1] / t.crd_beta
        weights = None
        if t.crd_reward_adaptive_kl and t.kl_beta:
            floor = 1e-4 / t.kl_beta
            weights = floor + a * (1 - floor)
        return self.with_kl(loss, metrics, v, batch, state, unit, policy, weights=weights)

    def after_epoch(self, policy, step):
        out = {}
        for name, spec in (("old", self.t.crd_old_decay), ("sampling", self.t.crd_sampling_decay)):
            if name in policy.snapshots:
                decay = snapshot_decay(step, spec)
                policy.blend_snapshot(name, decay)
                out[f"train/crd_{name}_decay"] = decay
        return out
