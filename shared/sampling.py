"""The rollout loop, used by the sampler service AND the embedded trainer.

One call denoises a batch from pure noise (t = 1) to data (t = 0) on a sigma grid.
Steps listed in ``sde_steps`` use the stochastic ``dynamics`` (Flow-SDE, Dance-SDE, CPS) and
are recorded (input latent, realized next latent, log-prob, and optionally the Gaussian
mean for GRPO-Guard); all other steps are deterministic Euler ODE steps (MixGRPO-style
windows). The trainer recomputes log-probs with the very same :func:`shared.flow.sde_step`,
which is what keeps train/inference consistent.

Randomness is per sample: sample ``i`` draws its initial noise and every step's noise from
its own ``torch.Generator(seed_i)``, so a sample does not depend on which batch or process
it was generated in. ``noise_device`` (``SamplingParams.noise_device``,
``train.rollout_noise_device``): ``"cpu"`` (default) draws with CPU generators, the same numbers
on every machine; ``"model"`` draws with generators on the model's device (on a GPU: no CPU work
and no host-to-device copy before the first step; the same seed then gives other numbers than on
the CPU, and the same ones on the same kind of GPU).

``state_dtype`` (``SamplingParams.state_dtype``, ``train.rollout_state_dtype``): the precision
of the latent chain. ``"bfloat16"`` rounds every state to bfloat16 and continues the chain
from the rounded state, and each log-prob is taken of the rounded next state, so storing the
states in bfloat16 (half the bytes of a trajectory blob) loses nothing the trainer replays.
The step math still runs in float32 (:func:`shared.flow.sde_step`); the Rollout's tensors
are float32 either way.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from shared.condition_images import ImageSource, condition_count_error
from shared.embedding_cache import encode_cached
from shared.flow import sde_step
from shared.flow.sde import check_sigma_grid
from shared.flow.solvers import dpm_solver_pp_step, tail_grid
from shared.models.base import Conditioning, FlowModelAdapter
from shared.models.prompt_length import check_prompt_lengths
from shared.seeds import seeded


@dataclasses.dataclass
class Rollout:
    """What a rollout keeps. ``S = len(sde_steps)``; latent dims ``...`` as the adapter's."""

    final_latents: torch.Tensor  # [B, ...] x at t = 0
    images: torch.Tensor | None  # [B, 3, H, W] float in [0, 1]; video families: [B, F, 3, H, W]
    sigmas: torch.Tensor  # [N + 1] the grid, 1 -> 0
    sde_steps: list[int]  # step indices that were stochastic (and are trainable)
    latents: torch.Tensor  # [B, S, ...] x_i fed to each SDE step
    next_latents: torch.Tensor  # [B, S, ...] realized x_{i+1}
    log_probs: torch.Tensor  # [B, S] log pi(x_{i+1} | x_i)
    stds: torch.Tensor  # [B, S] per-step Gaussian std
    means: torch.Tensor | None  # [B, S, ...] Gaussian means (kept for GRPO-Guard)


def per_sample_noise(generators: list[torch.Generator], shape: tuple[int, ...],
                     device: torch.device) -> torch.Tensor:
    """``[B, *shape]`` float32 standard normal noise, row ``i`` from ``generators[i]`` (drawn on the
    generators' device, then moved to ``device``)."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)


def noise_generator_device(noise_device: str, model_device: torch.device) -> torch.device:
    """The device the rollout's generators draw on: ``"cpu"`` or ``"model"`` (``model_device``)."""
    if noise_device == "cpu":
        return torch.device("cpu")
    if noise_device == "model":
        return model_device
    raise ValueError(f"noise_device must be 'cpu' or 'model', got {noise_device!r} "
                     f"(train.rollout_noise_device)")


def step_noise(generators: list[torch.Generator], shape: tuple[int, ...], steps: int,
               device: torch.device) -> torch.Tensor:
    """``[steps, B, *shape]`` float32 standard normal noise for ``steps`` SDE steps, row ``b`` of
    step ``k`` the ``k``-th draw of ``generators[b]`` after its initial noise (the values
    :func:`per_sample_noise` would give step by step), moved to ``device`` in one copy."""
    if steps == 0:
        return torch.zeros((0, len(generators), *shape), device=device)
    host = torch.stack([torch.stack([torch.randn(shape, generator=g, device=g.device) for _ in range(steps)])
                        for g in generators], dim=1)
    if host.device == device:
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


#: how a rollout's deterministic tail after its last SDE step may run (``rollout(tail_solver=...)``)
TAIL_SOLVERS = ("euler", "dpm_solver++")


@torch.no_grad()
def rollout(
    adapter: FlowModelAdapter,
    cond: Conditioning,
    seeds: list[int],
    *,
    resolution: tuple[int, int],
    sigmas: torch.Tensor,
    guidance_scale: float,
    dynamics: str,
    noise_level: float,
    sde_steps: list[int],
    keep_means: bool = False,
    log_prob_reduction: str = "mean",
    transformer: nn.Module | None = None,
    decode: bool = True,
    num_frames: int | None = None,
    state_dtype: str = "float32",
    noise_device: str = "cpu",
    init_seeds: list[int] | None = None,
    tail_solver: str | None = None,
    tail_ratio: float = 1.0,
) -> Rollout:
    """Denoise ``len(seeds)`` samples; see the module docstring.

    Args:
        cond: encoded prompts, one row per sample (``[B, ...]`` tensors).
        seeds: one integer seed per sample.
        sigmas: ``[N + 1]`` descending grid from 1 to 0 (``adapter.sigmas(N, resolution)``).
        sde_steps: indices in ``[0, N - 1)`` that use ``dynamics``; ignored for ``ODE``.
        transformer: module to call instead of ``adapter.transformer`` (EMA view, DDP copy).
        state_dtype: ``"float32"`` or ``"bfloat16"``: the chain's precision (module docstring).
        num_frames: frames per video for video families (``None`` = the family's default); image
            families take ``None`` or 1 (``adapter.sample_shape``).
        noise_device: ``"cpu"`` or ``"model"``: where the per-sample generators draw (module docstring).
        init_seeds: one seed per sample for its initial noise alone (``train.shared_initial_noise``:
            a group's members start from the same noise and differ only by their SDE steps' noise,
            which still comes from ``seeds``, draw for draw as without ``init_seeds``); ``None``:
            each sample's initial noise is the first draw of its ``seeds`` generator. Samples with
            the same initial seed and conditioning are in the same state until the first SDE step,
            so that ODE prefix runs once for them (:func:`shared_prefix_rows`; TempFlow-GRPO's
            branching from a shared prefix).
        tail_solver: the deterministic steps after the last SDE step (MixGRPO-Flash,
            :mod:`shared.flow.solvers`): ``None`` = Euler on the grid as given; ``"euler"`` or
            ``"dpm_solver++"`` (second-order multistep) on the tail cut to ``tail_ratio`` of its
            steps (:func:`~shared.flow.solvers.tail_grid`). The returned rollout's ``sigmas`` is the
            grid actually run; the SDE steps and their sigmas are the same either way.
    """
    device = next(adapter.transformer.parameters()).device
    make = lambda s: seeded(s, noise_generator_device(noise_device, device))  # noqa: E731
    generators = [make(s) for s in seeds]
    shape = adapter.sample_shape(resolution, num_frames)
    x = per_sample_noise(generators, shape, device)  # drawn either way: the SDE noise that follows is the same
    if init_seeds is not None:
        x = per_sample_noise([make(s) for s in init_seeds], shape, device)
    x = x.to(state_torch_dtype(state_dtype))
    stochastic = set() if dynamics == "ODE" else set(sde_steps)
    last = max(stochastic) if stochastic else None
    if tail_solver is not None and last is not None:
        if tail_solver not in TAIL_SOLVERS:
            raise ValueError(f"tail_solver {tail_solver!r}: choose one of {', '.join(TAIL_SOLVERS)}")
        sigmas = tail_grid(sigmas, last, tail_ratio)
    dpm = tail_solver == "dpm_solver++" and last is not None
    host_grid = sigmas.tolist() if dpm else None
    prev_x0 = None  # (x0 prediction, sigma) of the step before, for the second-order tail
    kept: dict[str, list[torch.Tensor]] = {k: [] for k in ("x", "next", "logp", "std", "mean")}
    batch = len(seeds)
    # everything the loop reads from the host goes to the device once, before it: no copy (and
    # so no host sync) between steps. Each sample's SDE noise is drawn in its generator's order.
    noises = step_noise(generators, shape, sum(1 for i in range(len(sigmas) - 1) if i in stochastic), device)
    check_sigma_grid(sigmas, stochastic, dynamics)  # on the host, once: the steps below check nothing
    grid = sigmas.to(device)
    start = min(stochastic) if stochastic else 0  # the deterministic prefix, when it may be shared
    shared = shared_prefix_rows(init_seeds, cond) if init_seeds is not None and start > 0 else None
    rows, rows_cond = x.shape[0], cond  # the rows the steps run on: one per group in a shared prefix
    if shared is not None:
        keep, back = (t.to(device) for t in shared)
        x, rows, rows_cond = x[keep], len(keep), cond.select(keep)
    for i in range(len(sigmas) - 1):
        if shared is not None and i == start:  # the prefix ends: every member from its group's state
            x, rows, rows_cond = x[back], batch, cond
        sigma = grid[i].expand(rows)
        sigma_next = grid[i + 1].expand(rows)
        v = adapter.velocity(x.float(), sigma, rows_cond, guidance_scale, transformer=transformer)
        if dpm and i >= last:  # the tail's history starts at the last SDE step (MixGRPO-Flash keeps its prediction)
            x0, before = x.float() - host_grid[i] * v.float(), prev_x0
            prev_x0 = (x0, host_grid[i])
            if i > last:  # the deterministic tail, second order
                x = dpm_solver_pp_step(x, x0, host_grid[i], host_grid[i + 1], *(before or (None, None)))
                continue
        if i in stochastic:
            noise = noises[len(kept["x"])]
            out = sde_step(x, v, sigma, sigma_next, dynamics=dynamics, noise_level=noise_level,
                           noise=noise, log_prob_reduction=log_prob_reduction, check_sigmas=False)
            kept["x"].append(x)
            kept["next"].append(out.prev_sample)
            kept["logp"].append(out.log_prob)
            kept["std"].append(out.std)
            if keep_means:
                kept["mean"].append(out.mean)
        else:
            out = sde_step(x, v, sigma, sigma_next, dynamics="ODE", noise_level=0.0, check_sigmas=False)
        x = out.prev_sample

    def stack(key: str, empty_shape: tuple[int, ...]) -> torch.Tensor:
        if kept[key]:
            return torch.stack(kept[key], dim=1).float()
        return torch.zeros((batch, 0, *empty_shape), device=device)

    x = x.float()
    return Rollout(
        final_latents=x,
        images=adapter.decode(x) if decode else None,
        sigmas=sigmas,
        sde_steps=sorted(stochastic),
        latents=stack("x", shape),
        next_latents=stack("next", shape),
        log_probs=stack("logp", ()),
        stds=stack("std", ()),
        means=stack("mean", shape) if keep_means else None,
    )


def rollout_autocast(adapter: FlowModelAdapter, mixed_precision: str):
    """``torch.autocast`` on the adapter's device in ``mixed_precision`` (``"bf16"`` / ``"fp16"``; ``"no"``:
    none), as accelerate's autocast around the embedded trainer's rollouts: samplers roll out in the
    trainer's precision (``SamplingParams.autocast``), so its replayed log-probs match theirs."""
    import contextlib

    if mixed_precision == "no":
        return contextlib.nullcontext()
    device = next(adapter.transformer.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def shared_prefix_rows(init_seeds: list[int], cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(keep, back)``: the rows of the first sample of each distinct initial seed, and for every
    sample the position of its seed's row in ``keep`` (``x_all = x_keep[back]``); ``None`` when all
    seeds differ, or when two samples share a seed but not their conditioning (then nothing is
    shared). The members of a ``train.shared_initial_noise`` group share both."""
    first: dict[int, int] = {}
    keep: list[int] = []
    back: list[int] = []
    for i, seed in enumerate(init_seeds):
        if seed not in first:
            first[seed] = len(keep)
            keep.append(i)
        back.append(first[seed])
    if len(keep) == len(init_seeds):
        return None
    keep_t, back_t = torch.tensor(keep), torch.tensor(back)
    for named in (cond.tensors, cond.negative or {}):
        for value in named.values():
            rows = keep_t.to(value.device)[back_t.to(value.device)]
            if not torch.equal(value, value[rows]):
                return None
    return keep_t, back_t


def as_hw(resolution: int | tuple[int, int]) -> tuple[int, int]:
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)  # type: ignore[return-value]


def encode(adapter: FlowModelAdapter, prompts: list[str], negatives: list[str | None],
           guidance_scale: float, images: Sequence[Sequence[ImageSource]] | None = None,
           resolution: int | tuple[int, int] | None = None, num_frames: int | None = None) -> Conditioning:
    """Encode prompts as rollouts do: negatives (``None`` = empty prompt) only when CFG is on.
    Prompts longer than a text encoder takes are truncated with one warning per model.

    ``images``: per prompt, its condition images (paths, bytes or PIL images;
    :mod:`shared.condition_images`), for image-conditioned families (``adapter.condition_images``),
    which also get the rollout ``resolution`` (and, video families, ``num_frames``: image-to-video
    condition latents span the video). Text-only families refuse condition images.

    Each distinct (prompt, negative, images, settings) is encoded once, on its own, and kept in the
    adapter's embedding cache (:func:`shared.embedding_cache.encode_cached`): a sample's
    conditioning does not depend on its batch mates, and is the same to the bit with or without
    the cache."""
    check_prompt_lengths(adapter, prompts + [n for n in negatives if n] if guidance_scale > 1.0 else prompts)
    if adapter.condition_images == (0, 0):
        if images is not None and any(len(row) for row in images):
            raise ValueError(condition_count_error(adapter.model_type, (0, 0), max(len(row) for row in images)))
        images, resolution, num_frames = None, None, None
    return encode_cached(adapter, prompts, negatives, cfg=guidance_scale > 1.0, images=images,
                         resolution=None if resolution is None else as_hw(resolution),
                         num_frames=num_frames if adapter.video else None)


def encode_batches(adapter: FlowModelAdapter, prompts: list[str], negatives: list[str | None],
                   guidance_scale: float, batch_size: int, images: Sequence[Sequence[ImageSource]] | None = None,
                   resolution: int | tuple[int, int] | None = None, num_frames: int | None = None) -> Conditioning:
    """:func:`encode` in micro-batches of ``batch_size``, concatenated (the trainer's view of
    prompts that a remote sampler rolled out; ``images``, ``resolution`` and ``num_frames`` as the
    rollout's)."""
    return Conditioning.cat([encode(adapter, prompts[s:s + batch_size], negatives[s:s + batch_size],
                                    guidance_scale, None if images is None else images[s:s + batch_size],
                                    resolution, num_frames) for s in range(0, len(prompts), batch_size)])


def rollout_batches(adapter: FlowModelAdapter, prompts: list[str], negatives: list[str | None],
                    seeds: list[int], *, batch_size: int, resolution, num_steps: int,
                    guidance_scale: float, dynamics: str, noise_level: float,
                    sde_steps: list[int], keep_means: bool, log_prob_reduction: str,
                    state_dtype: str = "float32", noise_device: str = "cpu",
                    transformer, progress=None, num_frames: int | None = None,
                    images: Sequence[Sequence[ImageSource]] | None = None,
                    on_batch: Callable[[slice, Rollout], None] | None = None,
                    encode_guidance_scale: float | None = None,
                    init_seeds: list[int] | None = None, offload: bool = False,
                    tail_solver: str | None = None, tail_ratio: float = 1.0) -> tuple[Conditioning, Rollout]:
    """Roll out ``prompts`` in micro-batches and concatenate (conditioning and rollout).
    ``tail_solver`` / ``tail_ratio``: the steps after the last SDE step (:func:`rollout`).
    ``offload``: each micro-batch's rollout and conditioning move to host memory as soon as it is
    done (and scored, with ``on_batch``), so the device holds one micro-batch's, not the epoch's.
    ``init_seeds``: per prompt, the seed of its initial noise alone (:func:`rollout`).
    ``images``: per prompt, its condition images (image-conditioned families, :func:`encode`).
    ``on_batch(rows, rollout)``: called with each micro-batch as soon as it is rolled out (e.g.
    :class:`shared.rewards.overlap.BackgroundScorer` scores it while the next one samples).
    ``encode_guidance_scale``: the CFG scale the returned conditioning is encoded for (``None`` =
    ``guidance_scale``); a larger one keeps negatives that a later forward needs (the trainer's
    guided KL reference) without changing the rollout."""
    encode_scale = guidance_scale if encode_guidance_scale is None else max(guidance_scale, encode_guidance_scale)
    sigmas = adapter.sigmas(num_steps, as_hw(resolution))  # [N + 1], the family's grid
    conds, outs = [], []
    for s in range(0, len(prompts), batch_size):
        sl = slice(s, s + batch_size)
        cond = encode(adapter, prompts[sl], negatives[sl], encode_scale,
                      None if images is None else images[sl], resolution, num_frames)
        outs.append(rollout(adapter, cond, seeds[sl], resolution=as_hw(resolution), sigmas=sigmas,
                            guidance_scale=guidance_scale, dynamics=dynamics,
                            noise_level=noise_level, sde_steps=sde_steps, keep_means=keep_means,
                            log_prob_reduction=log_prob_reduction, state_dtype=state_dtype,
                            noise_device=noise_device, transformer=transformer,
                            num_frames=num_frames, init_seeds=None if init_seeds is None else init_seeds[sl],
                            tail_solver=tail_solver, tail_ratio=tail_ratio))
        conds.append(cond)
        if on_batch is not None:
            on_batch(slice(s, s + len(prompts[sl])), outs[-1])
        if offload:  # train.offload_samples_to_cpu: the epoch's trajectories wait in host memory
            outs[-1], conds[-1] = to_host(outs[-1]), conds[-1].to("cpu")
        if progress is not None:
            progress(len(prompts[sl]))
    cat = lambda f: None if getattr(outs[0], f) is None else torch.cat([getattr(o, f) for o in outs])  # noqa: E731
    merged = Rollout(final_latents=cat("final_latents"), images=cat("images"), sigmas=outs[0].sigmas,  # as run
                     sde_steps=outs[0].sde_steps, latents=cat("latents"),
                     next_latents=cat("next_latents"), log_probs=cat("log_probs"),
                     stds=cat("stds"), means=cat("means"))
    return Conditioning.cat(conds), merged


def to_host(r: Rollout) -> Rollout:
    """``r`` with every tensor in host memory (page-locked where CUDA is, so the trainer's later
    copies back to the device overlap with its compute)."""
    pin = torch.cuda.is_available()

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or t.device.type == "cpu":
            return t
        t = t.to("cpu")
        return t.pin_memory() if pin else t
    return dataclasses.replace(r, **{f.name: move(getattr(r, f.name)) for f in dataclasses.fields(r)
                                     if isinstance(getattr(r, f.name), torch.Tensor)})


STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def state_torch_dtype(name: str) -> torch.dtype:
    if name not in STATE_DTYPES:
        raise ValueError(f"state dtype {name!r} is not one of {sorted(STATE_DTYPES)}. Fix: set "
                         f"train.rollout_state_dtype to float32 or bfloat16.")
    return STATE_DTYPES[name]


def _consecutive(steps: list[int]) -> bool:
    return bool(steps) and steps == list(range(steps[0], steps[0] + len(steps)))


_LITTLE = sys.byteorder == "little"


def _bf16_bits(x: torch.Tensor) -> np.ndarray:
    """The bfloat16 bits of float32 CPU values that are exact in bfloat16: the high half of
    each float32 (a strided view, no arithmetic; little-endian hosts)."""
    return x.detach().numpy().view(np.uint16)[..., 1::2]


def _empty_like_host(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        from shared.store import empty  # numpy-allocated: cheaper first touch of big buffers

        return empty(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def pack_trajectory(roll: Rollout, state_dtype: str = "float32") -> dict[str, torch.Tensor]:
    """A rollout as flat tensors for storage, each latent state stored ONCE.

    The trainable transitions ``x_i -> x_{i+1}`` (``i`` in ``sde_steps``) share states when
    steps are consecutive, so ``states [B, U, ...]`` holds the ``U`` distinct step indices in
    ``state_steps [U]`` (a window of ``S`` consecutive steps needs ``S + 1`` states, not ``2 S``).
    ``states`` are in ``state_dtype``: ``"bfloat16"`` only for a rollout made with that state
    dtype (its states are exact in bfloat16; checked on the first state). Also, float32:
    ``final_latents [B, ...]``, ``log_probs [B, S]``, ``stds [B, S]``, ``sigmas [N + 1]``,
    ``sde_steps [S]`` and, if kept, ``means [B, S, ...]``. Inverse: :func:`unpack_trajectory`.
    """
    dtype = state_torch_dtype(state_dtype)
    steps = roll.sde_steps
    state_steps = sorted(set(steps) | {i + 1 for i in steps})
    where = {s: j for j, s in enumerate(state_steps)}
    b = roll.final_latents.shape[0]
    states = _empty_like_host((b, len(state_steps), *roll.final_latents.shape[1:]), dtype,
                              roll.final_latents.device)
    bits = (dtype == torch.bfloat16 and _LITTLE and states.device.type == "cpu"
            and roll.latents.dtype == roll.next_latents.dtype == torch.float32)
    if _consecutive(steps) and bits:  # bf16-exact float32 -> bf16 on the CPU: copy the high halves
        dst = states.view(torch.int16).numpy().view(np.uint16)
        np.copyto(dst[:, :len(steps)], _bf16_bits(roll.latents))
        np.copyto(dst[:, len(steps)], _bf16_bits(roll.next_latents[:, -1]))
    elif _consecutive(steps):  # the common window: two whole-tensor copies
        states[:, :len(steps)].copy_(roll.latents)
        states[:, len(steps)].copy_(roll.next_latents[:, -1])
    else:
        for k, i in enumerate(steps):
            states[:, where[i]] = roll.latents[:, k]
            states[:, where[i + 1]] = roll.next_latents[:, k]
    if dtype != torch.float32 and steps and not torch.equal(states[:1, :1].float(), roll.latents[:1, :1].float()):
        raise ValueError(f"this rollout's latent states are not exact in {state_dtype}: storing them so "
                         f"would change what the trainer replays. Fix: roll out with state_dtype="
                         f"{state_dtype!r} (train.rollout_state_dtype), or store float32.")
    out = {"states": states, "state_steps": torch.tensor(state_steps, dtype=torch.long),
           "sde_steps": torch.tensor(steps, dtype=torch.long),
           "final_latents": roll.final_latents.float(), "log_probs": roll.log_probs.float(),
           "stds": roll.stds.float(), "sigmas": roll.sigmas.float()}
    if roll.means is not None:
        out["means"] = roll.means.float()
    return out


def unpack_trajectory(t: dict[str, torch.Tensor]) -> Rollout:
    """Inverse of :func:`pack_trajectory` (``images`` is None: they travel separately).

    The Rollout's tensors are float32 (bfloat16 states converted once). With consecutive SDE
    steps, ``latents`` and ``next_latents`` are overlapping views of the one state tensor (no
    copy): treat them as read-only."""
    states = t["states"]
    if states.dtype == torch.bfloat16 and _LITTLE and states.device.type == "cpu":
        out = _empty_like_host(tuple(states.shape), torch.float32, states.device)  # bits << 16: exact
        np.left_shift(states.view(torch.int16).numpy().view(np.uint16), 16,
                      out=out.numpy().view(np.uint32), dtype=np.uint32)
        states = out
    elif states.dtype != torch.float32:
        states = _empty_like_host(tuple(states.shape), torch.float32, states.device).copy_(states)
    where = {int(s): j for j, s in enumerate(t["state_steps"])}
    steps = [int(i) for i in t["sde_steps"]]
    if _consecutive(steps) and all(where[i] == where[steps[0]] + k for k, i in enumerate(steps + [steps[-1] + 1])):
        a, n = where[steps[0]], len(steps)
        latents, next_latents = states[:, a:a + n], states[:, a + 1:a + n + 1]
    else:
        latents = states[:, [where[i] for i in steps]]
        next_latents = states[:, [where[i + 1] for i in steps]]
    return Rollout(final_latents=t["final_latents"], images=None, sigmas=t["sigmas"],
                   sde_steps=steps, latents=latents, next_latents=next_latents, log_probs=t["log_probs"],
                   stds=t["stds"], means=t.get("means"))


def rollout_with(adapter: FlowModelAdapter, prompts: list[str], negatives: list[str | None],
                 seeds: list[int], params, *, transformer, progress=None,
                 images: Sequence[Sequence[ImageSource]] | None = None,
                 on_batch: Callable[[slice, Rollout], None] | None = None,
                 encode_guidance_scale: float | None = None,
                 init_seeds: list[int] | None = None, offload: bool = False) -> tuple[Conditioning, Rollout]:
    """:func:`rollout_batches` with the settings of a :class:`shared.protocol.SamplingParams`
    (what the embedded trainer and the sampler service both roll out from); ``images``: per
    prompt, its condition images (image-conditioned families); ``on_batch``,
    ``encode_guidance_scale``: as there."""
    return rollout_batches(
        adapter, prompts, negatives, seeds, batch_size=params.batch_size, resolution=params.resolution,
        num_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
        dynamics=params.dynamics, noise_level=params.noise_level, sde_steps=params.sde_steps,
        keep_means=params.keep_means, log_prob_reduction=params.log_prob_reduction,
        state_dtype=params.state_dtype, noise_device=params.noise_device,
        transformer=transformer, progress=progress, num_frames=params.num_frames, images=images,
        on_batch=on_batch, encode_guidance_scale=encode_guidance_scale, init_seeds=init_seeds,
        offload=offload, tail_solver=params.tail_solver, tail_ratio=params.tail_ratio)
