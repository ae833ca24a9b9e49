"""Pretraining-data mix (``train.ptx_coef``): the flow-matching loss on (caption, image) pairs
added to the RL loss, as InstructGPT's PPO-ptx mixes the pretraining objective into PPO and
ImageReward's ReFL adds the pretraining loss to its reward loss, to keep the policy close to
the data distribution while the reward moves it.

``train.ptx_dataset`` is a folder whose ``train.jsonl`` rows are ``{"prompt": ..., "image":
...}`` (images under its ``images/``, as any dataset folder; :mod:`trainer.data`). At start the
images are resized to ``train.resolution`` and encoded to latents once (``adapter.encode_latents``,
the inverse of ``decode``'s normalization; image families without condition images) and kept on
the host (``N`` float32 latents: 1 MiB each for 16 x 128 x 128, 1024 px with an 8x VAE); every
micro-batch then draws ``train.ptx_batch_size`` of them (seeded), noises them at logit-normal
times (SD3's pretraining distribution) and regresses the conditional velocity (no CFG) on the
rectified-flow target ``eps - x0``. Captions go through the embedding cache like rollout prompts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shared.condition_images import open_image
from shared.embedding_cache import adapter_device
from shared.sampling import as_hw, encode
from shared.seeds import seeded
from trainer.data import DatasetError, read_split
from trainer.timesteps import SIGMA_MIN, logit_normal_draws


def logit_normal_sigmas(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """:func:`trainer.timesteps.logit_normal_draws` clamped to ``[SIGMA_MIN, 1 - SIGMA_MIN]``."""
    return logit_normal_draws(n, generator, mean, std).clamp(SIGMA_MIN, 1 - SIGMA_MIN)


def flow_matching_loss(v: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the velocity ``v [B, ...]`` to the rectified-flow target ``eps - x0``
    (for ``x_t = (1 - sigma) x0 + sigma eps``); a scalar."""
    return F.mse_loss(v.float(), (eps - x0).float())


class PretrainMix:
    """The pretraining pairs of ``train.ptx_dataset`` as latents, and their loss for a policy."""

    def __init__(self, cfg, adapter) -> None:
        t = cfg.train
        if adapter.condition_images[0] > 0:
            raise ValueError(
                f"train.ptx_coef: model_type {adapter.model_type} needs condition images, and pretraining "
                f"pairs are (caption, target image) only in this version. Fix: set train.ptx_coef: 0.")
        rows = read_split(t.ptx_dataset, "train")
        if rows is None:
            raise DatasetError(f"train.ptx_dataset: {t.ptx_dataset!r} has no train.jsonl. Fix: write one with "
                               f'{{"prompt": ..., "image": ...}} rows.')
        for row in rows:
            if len(row.images) != 1:
                raise DatasetError(f"{row.source}: a pretraining row needs exactly one \"image\" (the target), "
                                   f"got {len(row.images)}. Fix: give every row of train.ptx_dataset one image.")
        self.coef, self.batch_size, self.adapter = t.ptx_coef, t.ptx_batch_size, adapter
        self.prompts = [r.prompt for r in rows]
        h, w = as_hw(t.resolution)
        latents = []
        for s in tqdm(range(0, len(rows), 64), desc="ptx: encoding images", unit="batch", leave=False,
                      disable=len(rows) <= 256):
            pixels = np.stack([np.asarray(open_image(r.images[0]).resize((w, h))) for r in rows[s:s + 64]])
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255).to(adapter_device(adapter))
            latents.append(adapter.encode_latents(x).cpu())
        self.latents = torch.cat(latents)

    def __len__(self) -> int:
        return len(self.prompts)

    def loss(self, policy, seed: int) -> torch.Tensor:
        """The flow-matching loss of the current policy on ``ptx_batch_size`` pairs drawn with
        ``seed`` (with gradients; the training loop weights it by ``ptx_coef``)."""
        g = seeded(seed)
        idx = torch.randint(len(self), (self.batch_size,), generator=g)
        x0 = self.latents[idx]
        sigma = logit_normal_sigmas(self.batch_size, g)
        eps = torch.randn(x0.shape, generator=g)
        device = adapter_device(self.adapter)
        x0, eps, sigma = x0.to(device), eps.to(device), sigma.to(device)
        view = sigma.view(-1, *[1] * (x0.dim() - 1))
        cond = encode(self.adapter, [self.prompts[i] for i in idx.tolist()], [None] * self.batch_size, 1.0)
        v = self.adapter.velocity((1 - view) * x0 + view * eps, sigma, cond, 1.0, transformer=policy.model)
        return flow_matching_loss(v, x0, eps)
