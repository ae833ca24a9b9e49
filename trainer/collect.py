"""One epoch's data on this process: pick prompt groups, roll out, score, compute advantages.

Every process draws the same epoch plan (which prompts form which group, every sample's
seed) from the run seed, then rolls out only its own whole groups. Rewards are gathered
across processes so advantages are computed once over the global batch, identically on
every rank, and each rank keeps its own slice.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from shared.config import Config, BatchGeometry
from shared.flow import flow_sigmas, select_sde_steps
from shared.models import Conditioning, FlowModelAdapter
from shared.rewards import score_all
from shared.sampling import Rollout, rollout
from trainer.advantages import compute_advantages
from trainer.data import PromptRow

SEED_STRIDE = 1_000_003  # keeps (epoch, group, member) seeds distinct


@dataclasses.dataclass
class EpochData:
    """This process's samples for one epoch (``n = samples_per_rank`` rows)."""

    prompts: list[str]
    group_ids: torch.Tensor  # [n] global group id (epoch * M + g), never the prompt text
    cond: Conditioning
    rollout: Rollout
    rewards: dict[str, torch.Tensor]  # [n] per reward, this rank
    advantages: torch.Tensor  # [n]
    metrics: dict[str, float]


def as_hw(resolution: int | tuple[int, int]) -> tuple[int, int]:
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)  # type: ignore[return-value]


def epoch_plan(num_prompts: int, geo: BatchGeometry, seed: int, epoch: int, rank: int
               ) -> tuple[list[int], list[int], list[int]]:
    """(prompt row index, group id, sample seed) for every sample this rank rolls out.

    Prompts are taken from a fresh seeded permutation per epoch (repeated if the epoch needs
    more groups than there are prompts), so duplicate prompt texts still form separate groups.
    """
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + epoch)
    reps = math.ceil(geo.groups_per_epoch / num_prompts)
    order = torch.cat([torch.randperm(num_prompts, generator=g) for _ in range(reps)])
    rows, groups, seeds = [], [], []
    for gi in range(rank * geo.groups_per_rank, (rank + 1) * geo.groups_per_rank):
        for k in range(geo.group_size):
            rows.append(int(order[gi]))
            groups.append(epoch * geo.groups_per_epoch + gi)
            seeds.append(((seed * SEED_STRIDE + epoch) * SEED_STRIDE + gi) * 1009 + k)
    return rows, groups, seeds


def rollout_batches(adapter: FlowModelAdapter, prompts: list[str], negatives: list[str | None],
                    seeds: list[int], *, batch_size: int, resolution, num_steps: int,
                    guidance_scale: float, dynamics: str, noise_level: float,
                    sde_steps: list[int], keep_means: bool, log_prob_reduction: str,
                    transformer, progress=None) -> tuple[Conditioning, Rollout]:
    """Roll out ``prompts`` in micro-batches and concatenate (conditioning and rollout)."""
    sigmas = flow_sigmas(num_steps, adapter.scheduler_shift)
    conds, outs = [], []
    for s in range(0, len(prompts), batch_size):
        sl = slice(s, s + batch_size)
        neg = [n or "" for n in negatives[sl]]
        cond = adapter.encode_prompts(prompts[sl], cfg=guidance_scale > 1.0, negative_prompts=neg)
        outs.append(rollout(adapter, cond, seeds[sl], resolution=as_hw(resolution), sigmas=sigmas,
                            guidance_scale=guidance_scale, dynamics=dynamics,
                            noise_level=noise_level, sde_steps=sde_steps, keep_means=keep_means,
                            log_prob_reduction=log_prob_reduction, transformer=transformer))
        conds.append(cond)
        if progress is not None:
            progress(len(prompts[sl]))
    cat = lambda f: None if getattr(outs[0], f) is None else torch.cat([getattr(o, f) for o in outs])  # noqa: E731
    merged = Rollout(final_latents=cat("final_latents"), images=cat("images"), sigmas=sigmas,
                     sde_steps=outs[0].sde_steps, latents=cat("latents"),
                     next_latents=cat("next_latents"), log_probs=cat("log_probs"),
                     stds=cat("stds"), means=cat("means"))
    return Conditioning.cat(conds), merged


def score(rewards: dict, specs, images, prompts, group_ids) -> dict[str, torch.Tensor]:
    """Score with every configured reward -> {label: [n] float32}."""
    return {spec.label: score_all(rewards[spec.label], images, prompts, group_ids,
                                  spec.batch_size).float().cpu()
            for spec in specs}


def collect_epoch(cfg: Config, accelerator, adapter, policy, algorithm, rewards: dict,
                  rows: list[PromptRow], epoch: int, progress=None) -> EpochData:
    t = cfg.train
    geo = cfg.geometry(accelerator.num_processes)
    idx, groups, seeds = epoch_plan(len(rows), geo, t.seed, epoch, accelerator.process_index)
    prompts = [rows[i].prompt for i in idx]
    negatives = [rows[i].negative_prompt for i in idx]
    sde_steps = select_sde_steps(t.train_steps, t.num_train_steps, t.num_inference_steps,
                                 seed=t.seed * SEED_STRIDE + epoch)
    cond, roll = rollout_batches(
        adapter, prompts, negatives, seeds, batch_size=t.per_device_batch_size,
        resolution=t.resolution, num_steps=t.num_inference_steps, guidance_scale=t.guidance_scale,
        dynamics=t.dynamics_type, noise_level=t.noise_level, sde_steps=sde_steps,
        keep_means=algorithm.keep_means, log_prob_reduction=t.log_prob_reduction,
        transformer=policy.sampling_module(), progress=progress)
    group_ids = torch.tensor(groups, dtype=torch.long)
    local = score(rewards, cfg.rewards, roll.images, prompts, group_ids)
    # gather over processes: every rank computes the same global advantages
    gathered = {k: accelerator.gather(v.to(accelerator.device)).cpu() for k, v in local.items()}
    all_groups = accelerator.gather(group_ids.to(accelerator.device)).cpu()
    weights = {s.label: s.weight for s in cfg.rewards}
    adv, metrics = compute_advantages(gathered, weights, all_groups,
                                      aggregation=t.advantage_aggregation,
                                      global_std=bool(t.global_std))
    n, r = len(idx), accelerator.process_index
    metrics = {f"train/{k}": float(v) for k, v in metrics.items()}
    for k, v in gathered.items():
        metrics[f"train/reward/{k}"] = float(torch.nanmean(v))
    return EpochData(prompts, group_ids, cond, roll, local, adv[r * n:(r + 1) * n], metrics)
