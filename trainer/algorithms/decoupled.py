"""Shared pieces of the sampler-decoupled algorithms (DiffusionNFT, AWM, DPO, DGPO, CRD).

They train on clean rollout results ``x0`` re-noised by the forward process
``x_t = (1 - t) x0 + t eps`` at freshly drawn timesteps, so any sampler (ODE included) works
and no per-step log-probs are stored.
"""

from __future__ import annotations

import torch

from shared.seeds import seeded
from trainer.algorithms.base import Algorithm, TrainBatch
from trainer.algorithms.losses import group_index, kl_v_based, mean_d
from trainer.collect import SEED_STRIDE
from trainer.timesteps import sample_train_sigmas


class Decoupled(Algorithm):
    def num_units(self, num_sde_steps: int) -> int:
        t = self.t
        # (+ 1e-9 as trainer.timesteps' candidate count: 100 * 0.29 is 28.999...)
        return t.num_train_timesteps or max(1, int(t.num_inference_steps * t.timestep_fraction + 1e-9))

    def noised(self, batch: TrainBatch, shared: bool | None = None) -> dict[str, torch.Tensor]:
        """Timesteps ``[T, B]``, noise ``eps [T, B, ...]`` and ``x_t [T, B, ...]`` (seeded); ``shared``
        (default ``train.group_shared_noise``): one ``(t, eps)`` per group (:meth:`group_noise`)."""
        t = self.t
        T, x0 = self.num_units(0), batch.final_latents.float()
        if t.group_shared_noise if shared is None else shared:
            sig, eps = self.group_noise(batch, T, tuple(x0.shape[1:]))
        else:
            g = seeded(batch.seed)
            sig = self.draw_sigmas(batch, T, batch.size, g)
            eps = torch.randn((T, *x0.shape), generator=g)
        sig, eps = sig.to(x0.device), eps.to(x0.device)
        view = sig.view(T, x0.shape[0], *[1] * (x0.dim() - 1))
        x_t = (1 - view) * x0 + view * eps
        return {"sigma": sig, "eps": eps, "x_t": x_t}

    def target(self, batch: TrainBatch, state: dict, unit: int) -> torch.Tensor:
        """Flow matching's velocity target ``eps - x0`` at training timestep ``unit`` (``[B, ...]``)."""
        return state["eps"][unit] - batch.final_latents.float()

    def flow_loss(self, v: torch.Tensor, batch: TrainBatch, state: dict, unit: int) -> torch.Tensor:
        """Each sample's flow-matching loss ``mean_d (v - (eps - x0))^2`` (``[B]``, float32)."""
        return mean_d((v.float() - self.target(batch, state, unit)) ** 2)

    def flow_losses(self, velocity, batch: TrainBatch, state: dict) -> list[torch.Tensor]:
        """:meth:`flow_loss` under ``velocity(x_t, sigma, cond)`` (e.g. ``policy.ref_velocity``), per unit."""
        return [self.flow_loss(velocity(state["x_t"][j], state["sigma"][j], batch.cond), batch, state, j)
                for j in range(state["sigma"].shape[0])]

    def with_kl(self, loss: torch.Tensor, metrics: dict, v: torch.Tensor, batch: TrainBatch, state: dict,
                unit: int, policy, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """``loss + kl_beta * mean_b(w_b ||v - v_ref||_b^2)`` when ``train.kl_beta > 0`` (``weights`` ``[B]``,
        default 1; the unweighted mean in ``metrics["kl"]``); every metric detached."""
        metrics = {k: m.detach() for k, m in metrics.items()}
        if self.t.kl_beta:
            x_t, sigma = state["x_t"][unit], state["sigma"][unit]
            per_sample = kl_v_based(v, policy.ref_velocity(x_t, sigma, batch.cond))
            kl = per_sample.mean() if weights is None else (weights.to(per_sample) * per_sample).mean()
            loss = loss + self.t.kl_beta * kl
            metrics["kl"] = per_sample.detach().mean()
        return loss, metrics

    @staticmethod
    def whole_groups_order(data, generator: torch.Generator) -> torch.Tensor:
        """Every row of the epoch, each group's rows contiguous, in a seeded random order of groups
        (for :attr:`~shared.config.WHOLE_GROUP_TRAINERS`, whose micro-batches hold whole groups)."""
        ids = data.group_ids
        groups = torch.unique(ids)
        order = groups[torch.randperm(groups.numel(), generator=generator)]
        return torch.cat([torch.nonzero(ids == g).flatten() for g in order])

    def check_whole_groups(self, batch: TrainBatch) -> None:
        sizes = self.group_sizes(batch)
        if len(set(sizes)) != 1:
            raise ValueError(f"{self.t.trainer_type}: a training micro-batch must hold whole groups, "
                             f"got group sizes {sizes}")

    @staticmethod
    def group_sizes(batch: TrainBatch) -> list[int]:
        """How many rows of each group the micro-batch holds."""
        return torch.bincount(group_index(batch.group_ids)[0]).tolist()

    def draw_sigmas(self, batch: TrainBatch, num: int, size: int, generator: torch.Generator) -> torch.Tensor:
        """``[num, size]`` training sigmas from the configured strategy (on the host)."""
        t = self.t
        return sample_train_sigmas(t.time_sampling_strategy, num, size, grid=self.host_sigmas(batch),
                                   time_shift=t.time_shift, timestep_fraction=t.timestep_fraction,
                                   generator=generator)

    def group_noise(self, batch: TrainBatch, num: int, shape: tuple[int, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``train.group_shared_noise``: sigmas ``[num, B]`` and noise ``[num, B, *shape]`` (host)
        that every sample of a group shares: column ``b`` is drawn from a generator seeded by
        ``(batch.epoch_seed, group id)``, so a group split across micro-batches still shares it.

        Each sample's own ``(sigma, eps)`` has the same distribution as without sharing, so the
        loss's expectation is unchanged; with advantages that sum to zero over a group, the part
        of each sample's gradient that only depends on ``(sigma, eps)`` cancels (a paired
        comparison, as Diffusion-DPO noises its winner and loser alike).
        """
        if batch.group_ids is None:
            raise ValueError("train.group_shared_noise needs the micro-batch's group ids (TrainBatch.group_ids); "
                             "build TrainBatch with them or set train.group_shared_noise: false")
        gids = batch.group_ids.tolist()
        drawn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for gid in gids:
            if gid not in drawn:
                g = torch.Generator().manual_seed((batch.epoch_seed * SEED_STRIDE + gid) % (2 ** 63))
                drawn[gid] = (self.draw_sigmas(batch, num, 1, g), torch.randn((num, 1, *shape), generator=g))
        cols = [drawn[gid] for gid in gids]
        return torch.cat([c[0] for c in cols], 1), torch.cat([c[1] for c in cols], 1)
