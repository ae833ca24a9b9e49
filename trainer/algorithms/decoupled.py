"""Shared pieces of the sampler-decoupled algorithms (DiffusionNFT, AWM).

They train on clean rollout results ``x0`` re-noised by the forward process
``x_t = (1 - t) x0 + t eps`` at freshly drawn timesteps, so any sampler (ODE included) works
and no per-step log-probs are stored.
"""

from __future__ import annotations

import torch

from trainer.algorithms.base import Algorithm, TrainBatch
from trainer.timesteps import sample_train_sigmas


class Decoupled(Algorithm):
    def num_units(self, num_sde_steps: int) -> int:
        t = self.t
        return t.num_train_timesteps or max(1, int(t.num_inference_steps * t.timestep_fraction))

    def noised(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Timesteps ``[T, B]``, noise ``eps [T, B, ...]`` and ``x_t [T, B, ...]`` (seeded)."""
        t = self.t
        g = torch.Generator().manual_seed(batch.seed)
        T, x0 = self.num_units(0), batch.final_latents.float()
        sig = sample_train_sigmas(t.time_sampling_strategy, T, batch.size, grid=self.host_sigmas(batch),
                                  time_shift=t.time_shift, timestep_fraction=t.timestep_fraction,
                                  generator=g).to(x0.device)  # [T, B]
        eps = torch.randn((T, *x0.shape), generator=g).to(x0.device)
        view = sig.view(T, x0.shape[0], *[1] * (x0.dim() - 1))
        x_t = (1 - view) * x0 + view * eps
        return {"sigma": sig, "eps": eps, "x_t": x_t}
