"""Held-out evaluation: deterministic ODE sampling with fixed seeds (``eval.images_per_prompt``
per prompt), EMA weights if enabled, at ``eval.resolution`` / ``eval.num_inference_steps``;
writes an image grid."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from shared.condition_images import open_rows
from shared.config import Config
from shared.rewards.base import details_all
from shared.rewards.multi import routed, row_metadata, score_specs
from shared.sampling import as_hw, rollout_batches
from shared.store import to_uint8
from trainer import context_parallel
from trainer.reporting import grid_frames, save_grid, save_video
from trainer.sharding import equal_share

GRID_MAX = 16


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How one prompt is evaluated: ``eval.*``, or its ``data.datasets`` source's overrides."""

    resolution: tuple[int, int]  # (height, width)
    num_inference_steps: int
    guidance_scale: float


def eval_settings(cfg: Config, source: str = "") -> EvalSettings:
    """The settings of the prompts of ``source`` (a ``data.datasets`` name; "" = one folder):
    its ``eval.resolution`` / ``num_inference_steps`` / ``guidance_scale`` where set, else the
    ``eval:`` section's."""
    e = cfg.eval
    own = next((s.eval for s in cfg.data.datasets or [] if s.name == source and s.eval is not None), None)
    pick = lambda key: getattr(e, key) if own is None or getattr(own, key) is None else getattr(own, key)  # noqa: E731
    return EvalSettings(as_hw(pick("resolution")), pick("num_inference_steps"), pick("guidance_scale"))


def nan_sum_count(values: torch.Tensor) -> torch.Tensor:
    """``[2]`` float64 (sum, count) of the non-NaN entries of ``values`` (NaN = abstained)."""
    v = values.detach().double().cpu()
    ok = ~torch.isnan(v)
    return torch.stack([v[ok].sum(), ok.sum().double()])


def union_keys(accelerator, detail_sums: dict) -> list[tuple[str, str]]:
    """The ``(reward label, detail key)`` pairs of every process, sorted: each process reduces
    them all in this order (one that saw none of a reward's prompts, or of a category, has fewer
    keys of its own, and a missing reduction would hang the others)."""
    keys = sorted(detail_sums)
    if accelerator.num_processes == 1:
        return keys
    from accelerate.utils import gather_object

    return sorted({(label, key) for label, key in gather_object(keys)})


def same_size(images: list[torch.Tensor]) -> torch.Tensor:
    """``[3, H, W]`` images (or ``[F, 3, H, W]`` videos) stacked at the first one's size (sources
    evaluated at other resolutions are resized for the grid)."""
    size = images[0].shape[-2:]
    fit = [x if x.shape[-2:] == size else
           torch.nn.functional.interpolate(x.reshape(-1, *x.shape[-3:]).float(), size=tuple(size), mode="bilinear",
                                           antialias=True, align_corners=False).reshape(*x.shape[:-2], *size).to(x.dtype)
           for x in images]
    return torch.stack(fit)


def prompt_samples(rank: int, world: int, num_prompts: int, k: int) -> list[int]:
    """The eval samples process ``rank`` of ``world`` generates: all ``k`` of every ``world``-th
    prompt (sample ``j`` is prompt ``j // k``), so a prompt's images are scored together."""
    return [j for p in range(rank, num_prompts, world) for j in range(p * k, (p + 1) * k)]


def grid_entry(image: torch.Tensor) -> torch.Tensor:
    """What the grid keeps of one sample: its 8-bit pixels on the CPU, of a video only the frames
    the grid shows (:func:`~trainer.reporting.grid_frames`)."""
    if image.ndim == 4:
        image = image[grid_frames(image.shape[0])]
    return to_uint8(image).cpu()


#: the longest side of an eval video's GIF (a preview: a Wan clip at full size would be tens of MB a file,
#: and gathered to rank 0 whole)
VIDEO_MAX_SIDE = 320


def video_entry(video: torch.Tensor) -> torch.Tensor:
    """A video ``[F, 3, H, W]`` in ``[0, 1]`` as its GIF keeps it: 8-bit, the longest side at most
    :data:`VIDEO_MAX_SIDE` (antialiased)."""
    h, w = video.shape[-2:]
    scale = VIDEO_MAX_SIDE / max(h, w)
    if scale < 1:
        video = torch.nn.functional.interpolate(video.float(), size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                                mode="bilinear", antialias=True, align_corners=False)
    return to_uint8(video).cpu()


def spread(items: list[int], n: int) -> list[int]:
    """Up to ``n`` of ``items``, evenly spread (first and last included)."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)] if n else []


def grid_picks(samples: list[int], k: int) -> list[int]:
    """Positions in ``samples`` for the eval grid: the first image of up to ``GRID_MAX`` prompts
    spread evenly over the list (so every part of a category-ordered test split shows)."""
    return spread([pos for pos, j in enumerate(samples) if j % k == 0], GRID_MAX)


@torch.no_grad()
def evaluate(cfg: Config, accelerator, adapter, policy, rewards: dict, specs, rows,
             run_dir: Path, epoch: int) -> dict:
    """Mean eval reward per reward over all prompts (all processes), plus the NaN-ignoring mean
    of each reward's ``details`` (``eval/{label}/{key}``) and the reward's aggregates of those
    means (``summarize_details``, e.g. toy_geneval's GenEval overall accuracy); rank 0 writes
    the grid."""
    e = cfg.eval
    # a context-parallel group's processes evaluate the same prompts (their data rank's) together
    rank = context_parallel.data_rank(cfg, accelerator.process_index)
    world = context_parallel.data_world(cfg, accelerator.num_processes)
    k = e.images_per_prompt
    # sample j is prompt j // k with seed e.seed + j, whatever the number of processes; a prompt's
    # k images stay on one process (rewards that compare them see the whole group)
    mine = prompt_samples(rank, world, len(rows), k)
    n_mine = len(mine)
    if policy.sharded:  # every process runs the same forwards (each all-gathers); extras dropped
        mine = equal_share(mine, [len(prompt_samples(r, world, len(rows), k)) for r in range(world)])
    sums = torch.zeros(len(specs), 2, dtype=torch.float64)  # (sum, count) per reward
    detail_sums: dict[tuple[str, str], torch.Tensor] = {}  # (label, key) -> (sum, count) of reward details
    # data.datasets: each reward scores only its sources' prompts, and is also reported per source
    sources = sorted({r.dataset for r in rows if r.dataset})
    per_source = torch.zeros(len(specs), len(sources), 2, dtype=torch.float64)
    grid: dict[int, torch.Tensor] = {}  # sample j -> its image, for the grid
    # prompts of sources with their own eval settings are sampled (and scored) apart; under FSDP
    # there is one group (the config refuses per-source settings there)
    groups: dict[EvalSettings, list[int]] = {}
    for pos, j in enumerate(mine):
        groups.setdefault(eval_settings(cfg, rows[j // k].dataset), []).append(pos)
    # the grid's samples, the same for any number of processes (each sends its own to rank 0)
    shown_grid = set(grid_picks(list(range(len(rows) * k)), k))
    videos: dict[int, torch.Tensor] = {}  # sample j -> its whole video (8-bit), written as a GIF
    shown_videos = set(spread(sorted(shown_grid), e.num_videos))
    for st, positions in groups.items():
        js = [mine[p] for p in positions]
        prompts = [rows[j // k].prompt for j in js]
        _, roll = rollout_batches(
            adapter, prompts, [rows[j // k].negative_prompt for j in js], [e.seed + j for j in js],
            batch_size=e.per_device_batch_size, resolution=st.resolution,
            num_steps=st.num_inference_steps, guidance_scale=st.guidance_scale, dynamics="ODE",
            noise_level=0.0, sde_steps=[], keep_means=False, log_prob_reduction="mean",
            transformer=policy.eval_module(), num_frames=e.num_frames,
            images=[rows[j // k].images for j in js] if any(r.images for r in rows) else None)
        keep = [i for i, p in enumerate(positions) if p < n_mine]  # (FSDP's padding samples dropped)
        if not keep:
            continue
        js, prompts, images = [js[i] for i in keep], [prompts[i] for i in keep], roll.images[keep]
        grid.update({j: grid_entry(images[n]) for n, j in enumerate(js) if j in shown_grid})
        if images.ndim == 5:  # video models
            videos.update({j: video_entry(images[n]) for n, j in enumerate(js) if j in shown_videos})
        group_ids = torch.tensor([j // k for j in js], dtype=torch.long)  # a prompt's images
        datasets = [rows[j // k].dataset for j in js] if sources else None
        # parsed once here (score_specs passes dicts through) and only when some reward reads it
        metadata = (row_metadata([rows[j // k].metadata for j in js])
                    if any(r.metadata for r in rewards.values()) else None)
        scores = score_specs(rewards, specs, images, prompts, group_ids,
                             condition_images=lambda js=js: open_rows([rows[j // k].images or [] for j in js]),
                             datasets=datasets, metadata=metadata)
        for r, spec in enumerate(specs):
            sums[r] += nan_sum_count(scores[spec.label])
            for s, name in enumerate(sources):
                per_source[r, s] += nan_sum_count(scores[spec.label][[d == name for d in datasets]])
            picks = routed(spec, datasets, len(prompts))
            if picks == []:  # none of these prompts is the reward's
                continue
            sub = (lambda xs: xs) if picks is None else (lambda xs, picks=picks: [xs[i] for i in picks])  # noqa: E731
            shown = images if picks is None else images[picks]
            for key, values in details_all(rewards[spec.label], shown, sub(prompts),
                                           None if metadata is None else sub(metadata)).items():
                total = detail_sums.get((spec.label, key), torch.zeros(2, dtype=torch.float64))
                detail_sums[(spec.label, key)] = total + nan_sum_count(values)
    if accelerator.num_processes > 1:  # rank 0 writes the grid: the others send it their entries
        import torch.distributed as dist

        parts = [None] * accelerator.num_processes if accelerator.is_main_process else None
        dist.gather_object((grid, videos), parts, dst=0)
        grid = {j: x for part in parts for j, x in part[0].items()} if parts is not None else {}
        videos = {j: x for part in parts for j, x in part[1].items()} if parts is not None else {}
    grid_images = same_size([grid[j].float() / 255 for j in sorted(grid)]) if grid else None
    sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    out: dict = {"epoch": epoch}
    for j, spec in enumerate(specs):  # NaN: every sample abstained (e.g. a groupwise reward, 1 image a prompt)
        out[f"eval/reward/{spec.label}"] = float(sums[j, 0] / sums[j, 1]) if sums[j, 1] > 0 else float("nan")
    if sources:
        per_source = accelerator.reduce(per_source.to(accelerator.device), reduction="sum").cpu()
        for j, spec in enumerate(specs):
            for s, name in enumerate(sources):
                if per_source[j, s, 1] > 0:  # the sources this reward scores
                    out[f"eval/reward/{spec.label}/{name}"] = float(per_source[j, s, 0] / per_source[j, s, 1])
    means: dict[str, dict[str, float]] = {spec.label: {} for spec in specs}
    for label, key in union_keys(accelerator, detail_sums):
        mine = detail_sums.get((label, key), torch.zeros(2, dtype=torch.float64))  # (0, 0): none here
        total = accelerator.reduce(mine.to(accelerator.device), reduction="sum").cpu()
        if total[1] > 0:
            means[label][key] = out[f"eval/{label}/{key}"] = float(total[0] / total[1])
    for spec in specs:
        if means[spec.label]:
            for key, value in rewards[spec.label].summarize_details(dict(means[spec.label])).items():
                out[f"eval/{spec.label}/{key}"] = float(value)
    if accelerator.is_main_process and grid_images is not None:
        name = f"eval_grid_epoch{epoch:04d}.png"
        save_grid(grid_images, run_dir / "images" / name)
        out["grid"] = f"images/{name}"
    if accelerator.is_main_process and videos:
        folder = f"images/eval_videos_epoch{epoch:04d}"
        shutil.rmtree(run_dir / folder, ignore_errors=True)  # an epoch evaluated again (a resumed run): its own files only
        out["videos"] = []
        for n, j in enumerate(sorted(videos)):
            save_video(videos[j], run_dir / folder / f"{n:02d}.gif", e.video_fps)
            out["videos"].append({"path": f"{folder}/{n:02d}.gif", "prompt": rows[j // k].prompt})
    return out
