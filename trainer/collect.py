"""One epoch's data on this process: plan the prompt groups, get them sampled and scored (by
a transport: :mod:`trainer.transport`), compute advantages.

Every process draws the same epoch plan (which prompts form which group, every sample's
seed) from the run seed, then has only its own whole groups rolled out. Rewards are gathered
across processes so advantages are computed once over the global batch, identically on
every rank, and each rank keeps its own slice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from shared.condition_images import open_rows
from shared.config import Config, BatchGeometry, kl_gate_proxy
from shared.flow import progressive_window, select_sde_steps
from shared.models import Conditioning
from shared.rewards.multi import score_specs
from shared.rewards.overlap import BackgroundScorer, can_overlap
from shared.protocol import SamplingParams
from shared.sampling import Rollout, as_hw, rollout_with
from shared.seeds import seeded
from trainer import context_parallel
from trainer.advantages import compute_advantages
from trainer.data import PromptRow

SEED_STRIDE = 1_000_003  # keeps (epoch, group, member) seeds distinct


@dataclasses.dataclass
class EpochData:
    """This process's samples for one epoch (``n = samples_per_rank`` rows)."""

    prompts: list[str]
    group_ids: torch.Tensor  # [n] CPU int64 global group id (epoch * M + g), never the prompt text
    cond: Conditioning
    rollout: Rollout
    rewards: dict[str, torch.Tensor]  # [n] per reward, this rank
    advantages: torch.Tensor  # [n]
    metrics: dict[str, float]
    kl_gate: torch.Tensor | None = None  # [n] bool: the samples train.kl_gate's KL applies to (None: all)


def apportion(total: int, weights: list[int], g: torch.Generator | None = None) -> list[int]:
    """Split ``total`` items between sources in proportion to ``weights``: each gets ``floor(total * w /
    sum)``, and the ``k`` items left go to ``k`` sources drawn with ``g`` by systematic sampling on the
    fractional parts (which sum to ``k``), so each source's expected count is its exact quota
    ``total * w / sum``. Without ``g``: to the largest fractional parts (the earlier source first on a
    tie), the same every time, so a source whose quota is always below one never gets an item (with
    ``g`` an epoch's draw gave 3:1 weights and 2 groups an epoch 8 : 0 groups over 100 epochs). Returns
    one count per weight, summing to ``total``."""
    whole = sum(weights)
    quotas = [total * w / whole for w in weights]
    counts = [math.floor(q) for q in quotas]
    left = total - sum(counts)
    if left and g is not None:
        point, edge = float(torch.rand((), generator=g)), 0.0  # points point, point + 1, ... over the parts
        for i, q in enumerate(quotas):
            lo, edge = edge, edge + (q - counts[i])
            if left and lo <= point < edge:
                counts[i] += 1
                point, left = point + 1, left - 1
    by_rest = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_rest[:left]:  # (without g; with g only what rounding left over)
        counts[i] += 1
    return counts


def repeated_permutation(n: int, count: int, g: torch.Generator) -> torch.Tensor:
    """``[count]`` indices into ``n`` rows: seeded permutations of ``range(n)`` drawn from ``g``
    and concatenated (as many as ``count`` needs), cut to ``count``."""
    return torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(count / n))])[:count]


def mixed_order(sources: list[tuple[int, int, int]], total: int, g: torch.Generator) -> torch.Tensor:
    """``[total]`` row indices for an epoch's groups drawn from several sources.

    ``sources``: ``(first row, rows, weight)`` per source, its rows contiguous in the row list.
    Each source supplies :func:`apportion`'s share of ``total`` (drawn with ``g``: its quota in
    expectation, every epoch), from its own seeded permutation
    (repeated when its share exceeds its rows); the shares are then shuffled together, so every
    rank's slice mixes the sources."""
    picks = []
    for (start, rows, _), share in zip(sources, apportion(total, [w for _, _, w in sources], g)):
        if share:
            picks.append(repeated_permutation(rows, share, g) + start)
    order = torch.cat(picks)
    return order[torch.randperm(total, generator=g)]


def epoch_plan(num_prompts: int, geo: BatchGeometry, seed: int, epoch: int, rank: int,
               sources: list[tuple[int, int, int]] | None = None) -> tuple[list[int], list[int], list[int]]:
    """(prompt row index, group id, sample seed) for every sample this rank rolls out.

    Prompts are taken from a fresh seeded permutation per epoch (repeated if the epoch needs
    more groups than there are prompts), so duplicate prompt texts still form separate groups.
    ``sources`` (``data.datasets``): the rows come from several sources by weight (:func:`mixed_order`).
    """
    g = seeded(seed * SEED_STRIDE + epoch)
    if sources is None:
        order = repeated_permutation(num_prompts, geo.groups_per_epoch, g)
    else:
        order = mixed_order(sources, geo.groups_per_epoch, g)
    rows, groups, seeds = [], [], []
    for gi in range(rank * geo.groups_per_rank, (rank + 1) * geo.groups_per_rank):
        for k in range(geo.group_size):
            rows.append(int(order[gi]))
            groups.append(epoch * geo.groups_per_epoch + gi)
            seeds.append(((seed * SEED_STRIDE + epoch) * SEED_STRIDE + gi) * 1009 + k)
    return rows, groups, seeds


@dataclasses.dataclass
class EpochPlan:
    """Everything about one epoch's samples on this process that is fixed before sampling."""

    epoch: int
    prompts: list[str]
    negatives: list[str | None]
    group_ids: list[int]  # global group id per sample
    seeds: list[int]  # noise seed per sample
    sde_steps: list[int]  # the stochastic (trainable) steps of this epoch; [] for ODE rollouts
    # condition image paths per sample (edit models; () for text-only rows); [] = none at all
    images: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    datasets: list[str] = dataclasses.field(default_factory=list)  # data.datasets name per sample; [] = one folder
    # seed of each sample's initial noise (train.shared_initial_noise: its group's); [] = its own seed's
    init_seeds: list[int] = dataclasses.field(default_factory=list)
    # each sample's row metadata (JSON object text, "" = none) for rewards that read it; [] = no row has any
    metadata: list[str] = dataclasses.field(default_factory=list)

    def subset(self, rows: list[int]) -> "EpochPlan":
        """The plan restricted to ``rows`` (whole groups dropped after dead-lettered tasks)."""
        pick = lambda xs: [xs[r] for r in rows]  # noqa: E731
        return EpochPlan(self.epoch, pick(self.prompts), pick(self.negatives), pick(self.group_ids),
                         pick(self.seeds), self.sde_steps, pick(self.images) if self.images else [],
                         pick(self.datasets) if self.datasets else [],
                         pick(self.init_seeds) if self.init_seeds else [],
                         pick(self.metadata) if self.metadata else [])

    @property
    def condition_images(self) -> list[tuple[str, ...]] | None:
        """Per sample its condition image paths, or ``None`` when no sample has any (what
        :func:`shared.sampling.encode` takes)."""
        return self.images if any(self.images) else None


def plan_epoch(cfg: Config, rows: list[PromptRow], epoch: int, rank: int, world_size: int) -> EpochPlan:
    t = cfg.train
    # a context-parallel group's processes plan the same samples (their data rank's)
    idx, groups, seeds = epoch_plan(len(rows), cfg.geometry(world_size), t.seed, epoch,
                                    context_parallel.data_rank(cfg, rank), source_spans(cfg, rows))
    if t.dynamics_type == "ODE":
        sde_steps = []
    elif t.sde_window is not None:  # MixGRPO: the window moves with the epoch
        w = t.sde_window
        sde_steps = progressive_window(epoch, t.num_inference_steps, w.size, w.shift_every, w.stride, w.roll_back)
    else:
        sde_steps = select_sde_steps(t.train_steps, t.num_train_steps, t.num_inference_steps,
                                     seed=t.seed * SEED_STRIDE + epoch)
    return EpochPlan(epoch, [rows[i].prompt for i in idx], [rows[i].negative_prompt for i in idx],
                     groups, seeds, sde_steps, [rows[i].images for i in idx],
                     [rows[i].dataset for i in idx] if cfg.data.datasets else [],
                     group_seeds(groups, seeds) if t.shared_initial_noise else [],
                     [rows[i].metadata for i in idx] if any(r.metadata for r in rows) else [])


def group_seeds(groups: list[int], seeds: list[int]) -> list[int]:
    """Per sample, the seed of its group's first member (a group's shared initial noise)."""
    first: dict[int, int] = {}
    for g, s in zip(groups, seeds):
        first.setdefault(g, s)
    return [first[g] for g in groups]


def source_spans(cfg: Config, rows: list[PromptRow]) -> list[tuple[int, int, int]] | None:
    """``(first row, rows, weight)`` of every training source of ``data.datasets`` in ``rows``
    (:func:`trainer.data.load_dataset`'s order), or None for one ``data.dataset_dir``."""
    if not cfg.data.datasets:
        return None
    spans, start = [], 0
    for src in cfg.data.datasets:
        if src.train is None:
            continue
        n = sum(1 for r in rows if r.dataset == src.name)
        spans.append((start, n, src.train.weight))
        start += n
    return spans


@dataclasses.dataclass
class Samples:
    """A transport's answer to a plan: the scored rollouts, rows in plan order."""

    cond: Conditioning
    rollout: Rollout
    rewards: dict[str, torch.Tensor]  # [n] per reward label, NaN = abstained
    policy_versions: list[int]  # the policy version each sample was drawn with
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    rows: list[int] | None = None  # plan rows these are (None = all; fewer when groups were dropped)


def samples_tensors(samples: Samples, state_dtype: str = "float32") -> dict[str, torch.Tensor]:
    """``samples``' trajectory (:func:`~shared.sampling.pack_trajectory`'s tensors under ``rollout/``,
    states in ``state_dtype``) and rewards (under ``reward/``), on the host: what a checkpoint's pending
    epoch and a context-parallel group's leader store or send (the conditioning is re-encoded from the
    plan where they are read). Inverse: :func:`tensors_parts`."""
    from shared.sampling import pack_trajectory

    roll = samples.rollout  # to the host first: packing allocates its states where the rollout is
    roll = dataclasses.replace(roll, **{f.name: getattr(roll, f.name).cpu() for f in dataclasses.fields(roll)
                                        if isinstance(getattr(roll, f.name), torch.Tensor)})
    tensors = {f"rollout/{k}": v.contiguous() for k, v in pack_trajectory(roll, state_dtype).items()}
    tensors.update({f"reward/{k}": v.detach().contiguous().cpu() for k, v in samples.rewards.items()})
    return tensors


def tensors_parts(flat: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`samples_tensors`' output as ``(trajectory tensors, rewards)``; ``unpack_trajectory``
    rebuilds the rollout from the first."""
    return ({k.removeprefix("rollout/"): v for k, v in flat.items() if k.startswith("rollout/")},
            {k.removeprefix("reward/"): v for k, v in flat.items() if k.startswith("reward/")})


def sampling_params(cfg: Config, plan: EpochPlan, keep_means: bool) -> SamplingParams:
    """How ``plan`` is rolled out (``train.*``), as the message samplers receive it."""
    t = cfg.train
    return SamplingParams(
        resolution=as_hw(t.resolution), num_inference_steps=t.num_inference_steps,
        guidance_scale=t.sampling_guidance_scale, dynamics=t.dynamics_type, noise_level=t.noise_level,
        sde_steps=plan.sde_steps, keep_means=keep_means, log_prob_reduction=t.log_prob_reduction,
        batch_size=t.rollout_batch_size or t.per_device_batch_size, num_frames=t.num_frames,
        state_dtype=t.rollout_state_dtype, noise_device=t.rollout_noise_device, autocast=t.mixed_precision,
        tail_solver=t.ode_tail.solver if t.ode_tail else None,
        tail_ratio=t.ode_tail.compress_ratio if t.ode_tail else 1.0)


def sample_locally(cfg: Config, adapter, policy, algorithm, rewards: dict, plan: EpochPlan,
                   progress=None) -> tuple[Conditioning, Rollout, dict[str, torch.Tensor]]:
    """Roll out ``plan`` with this process's sampling weights and score it (the local transport).

    With ``train.overlap_scoring`` (default: when sampling on a GPU) and only pointwise rewards,
    each micro-batch is scored in a background thread while the next one samples
    (:mod:`shared.rewards.overlap`); the scores are the same as scoring the whole epoch afterwards."""
    group_ids = torch.tensor(plan.group_ids, dtype=torch.long)

    def conditions(rows: slice = slice(None)) -> list:  # read only if a reward wants them
        return open_rows((plan.condition_images or [[]] * len(plan.prompts))[rows])

    overlap = cfg.train.overlap_scoring
    if overlap is None:  # on a CPU the scoring thread slows sampling down more than it hides
        first = next(adapter.transformer.parameters(), None)  # (not the sampling module: an EMA
        overlap = first is not None and first.device.type == "cuda"  # view may hold no parameters)
    scorer = (BackgroundScorer(rewards, cfg.rewards, plan.prompts, group_ids, conditions, plan.datasets,
                               plan.metadata)
              if overlap and can_overlap(rewards) else None)
    with scorer or contextlib.nullcontext():
        cond, roll = rollout_with(adapter, plan.prompts, plan.negatives, plan.seeds,
                                  sampling_params(cfg, plan, algorithm.keep_means),
                                  transformer=policy.sampling_module(), progress=progress,
                                  images=plan.condition_images, on_batch=scorer.submit if scorer else None,
                                  init_seeds=plan.init_seeds or None,
                                  offload=cfg.train.offload_samples_to_cpu,
                                  # with the negatives a guided KL reference (train.ref_guidance_scale) needs
                                  encode_guidance_scale=cfg.train.encode_guidance_scale)
        scores = scorer.result() if scorer else score_specs(
            rewards, cfg.rewards, roll.images, plan.prompts, group_ids, condition_images=conditions,
            datasets=plan.datasets, metadata=plan.metadata)
    return cond, roll, scores


#: how a queue metric of each process combines into the run's: counts add up, extremes take the max,
#: the rest (the mean policy lag, over equal numbers of samples) average
QUEUE_SUM = ("queue/duplicates_total", "queue/dropped_samples")
QUEUE_MAX = ("queue/policy_lag_max", "queue/collect_seconds", "queue/samplers")


def across_processes(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """This epoch's queue metrics over every process (:data:`QUEUE_SUM`, :data:`QUEUE_MAX`, else
    the mean); every process reports the same keys (its transport's). One process: unchanged.
    ``queue/samplers`` takes the largest count, a lower bound of the distinct sampler workers."""
    if accelerator.num_processes == 1 or not metrics:
        return metrics
    import torch.distributed as dist

    keys = sorted(metrics)
    out = {}
    for op, names in ((dist.ReduceOp.SUM, [k for k in keys if k not in QUEUE_MAX]),
                      (dist.ReduceOp.MAX, [k for k in keys if k in QUEUE_MAX])):
        if not names:
            continue
        values = torch.tensor([metrics[k] for k in names], dtype=torch.float64, device=accelerator.device)
        dist.all_reduce(values, op=op)
        for k, v in zip(names, values.tolist()):
            out[k] = v if op == dist.ReduceOp.MAX or k in QUEUE_SUM else v / accelerator.num_processes
    return out


def finish_epoch(cfg: Config, accelerator, plan: EpochPlan, samples: Samples, version: int,
                 gate=None) -> EpochData:
    """Advantages over the global batch (rewards gathered from every process), this rank's slice.
    ``gate``: ``train.kl_gate``'s :class:`~trainer.kl_gate.KLGateState`, which picks this epoch's
    gated samples from the same global batch.

    ``version`` is the policy version about to be trained; ``version - sample version`` is the
    staleness each sample is trained with (reported as ``queue/policy_lag``).
    """
    t = cfg.train
    group_ids = torch.tensor(plan.group_ids, dtype=torch.long)
    local = samples.rewards
    # gather over processes: every rank computes the same global advantages
    # (context parallelism: one copy of each group's samples, which its processes all hold)
    world, cp = accelerator.num_processes, context_parallel.degree(cfg)

    def once(x: torch.Tensor) -> torch.Tensor:
        return context_parallel.one_per_group(accelerator.gather(x.to(accelerator.device)).cpu(), world, cp)

    gathered = {k: once(v) for k, v in local.items()}
    all_groups = once(group_ids)
    weights = {s.label: s.weight for s in cfg.rewards}
    applies = None
    if plan.datasets:  # data.datasets: the source of every sample of the global batch
        names = [src.name for src in cfg.data.datasets if src.train is not None]
        which = once(torch.tensor([names.index(d) for d in plan.datasets]))
        applies = {s.label: torch.tensor([names[i] in s.datasets for i in which.tolist()])
                   for s in cfg.rewards if s.datasets}
    shaped = {k: v for k, v in gathered.items() if k != t.diversity_shaping}  # diversity_shaping: not a reward
    adv, metrics = compute_advantages(shaped, {k: weights[k] for k in shaped}, all_groups,
                                      aggregation=t.advantage_aggregation,
                                      global_std=bool(t.global_std), scale_by_std=t.advantage_std,
                                      applies=applies and {k: v for k, v in applies.items() if k in shaped},
                                      shaping=gathered.get(t.diversity_shaping))
    n, r = len(plan.prompts), context_parallel.data_rank(cfg, accelerator.process_index)
    metrics = {f"train/{k}": float(v) for k, v in metrics.items()}
    for k, v in gathered.items():
        metrics[f"train/reward/{k}"] = float(torch.nanmean(v))
    if plan.datasets:  # each source's share of the epoch and its mean rewards
        for i, name in enumerate(names):
            mine = which == i
            metrics[f"train/samples/{name}"] = float(mine.sum())
            for k, v in gathered.items():
                if mine.any() and not torch.isnan(v[mine]).all():
                    metrics[f"train/reward/{k}/{name}"] = float(torch.nanmean(v[mine]))
    lags = [version - v for v in samples.policy_versions]
    metrics["queue/policy_lag"] = sum(lags) / len(lags)
    metrics["queue/policy_lag_max"] = float(max(lags))
    metrics.update(samples.metrics)
    metrics.update(across_processes(accelerator, {k: v for k, v in metrics.items() if k.startswith("queue/")}))
    mask = None
    if gate is not None:  # the same on every rank: the global batch's rewards
        proxy = kl_gate_proxy(t, [s.label for s in cfg.rewards], weights)
        mask, gate_metrics = gate.mask(gathered[proxy], [gathered[a] for a in t.kl_gate.auxiliary],
                                       seed=t.seed * 1_000_003 + plan.epoch)
        metrics.update(gate_metrics)
        mask = mask[r * n:(r + 1) * n]
    return EpochData(plan.prompts, group_ids, samples.cond, samples.rollout, local,
                     adv[r * n:(r + 1) * n], metrics, mask)
