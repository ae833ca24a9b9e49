"""Training-timestep sampling for the decoupled trainers (DiffusionNFT, AWM).

These trainers do not replay the rollout's own denoising transitions: they re-noise the final
clean sample to fresh noise levels and regress the velocity there. This module draws those
noise levels.

Conventions (see ``algorithms.md`` §0):
    * ``sigma`` is the rectified-flow time: ``x_t = (1 - sigma) * x0 + sigma * eps``;
      ``sigma = 1`` is pure noise, ``sigma = 0`` is data. Transformers get ``1000 * sigma``.
    * ``grid`` is the rollout's sigma grid ``[N + 1]``, descending from (about) 1 to a final
      0; ``grid[i]`` is the sigma at which denoising step ``i`` starts.
    * ``timestep_fraction`` in ``(0, 1]`` is the part of the denoising axis, measured from the
      noise end (``sigma = 1``) toward data, that is trained.
    * The result has shape ``[num, batch_size]``: column ``b`` holds the ``num`` sigmas of
      sample ``b``. Every sample draws its own, independently stratified set (Flow-Factory
      shares one timestep per row across the whole micro-batch), and each column is in random
      order, so row ``k`` is not systematically the noisiest.
"""

from __future__ import annotations

import torch

STRATEGIES = ("uniform", "logit_normal", "discrete", "discrete_with_init", "discrete_wo_init")

SIGMA_MIN = 1e-3  # continuous strategies never return sigma below this (the velocity target is ill-posed at 0)


def logit_normal_draws(n: int, generator: torch.Generator | None, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """``[n]`` rectified-flow times ``sigmoid(mean + std * z)``, ``z ~ N(0, 1)`` drawn from ``generator``
    (1 = pure noise; unclamped): SD3's logit-normal at the defaults, ``median = sigmoid(mean)``.
    Used where whole batches are drawn i.i.d. (pretraining, ``train.ptx_coef``); the trainers'
    per-sample stratified strategy is :func:`sample_train_sigmas`."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def sd3_time_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 resolution shift ``s * t / (1 + (s - 1) * t)``; ``shift > 1`` moves sigmas toward noise."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def _stratified_unit(num: int, batch_size: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """``u[k, b] = (k + U) / num`` with ``U ~ U[0, 1)`` drawn per entry: one value per stratum per column."""
    k = torch.arange(num, dtype=torch.float64, device=device).unsqueeze(1)
    jitter = torch.rand(num, batch_size, generator=generator, dtype=torch.float64, device=device)
    return (k + jitter) / num


def _permute_columns(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Shuffle each column of ``x [num, B]`` independently."""
    order = torch.rand(x.shape, generator=generator, device=x.device).argsort(dim=0)
    return torch.gather(x, 0, order)


def _stratified_indices(
    lo: int, hi: int, num: int, batch_size: int, generator: torch.Generator | None, device
) -> torch.Tensor:
    """Stratified integer picks over ``[lo, hi)``: ``[num, batch_size]`` int64.

    Stratum boundaries are ``floor(linspace(lo, hi, num + 1))``; stratum ``k`` yields
    ``lower + floor(U * (upper - lower))``. With ``num <= hi - lo`` every stratum is non-empty,
    so the picks of a column are distinct and one per stratum; with more picks than integers
    some strata are empty and repeat their lower bound.
    """
    bounds = torch.linspace(lo, hi, num + 1, dtype=torch.float64, device=device).floor().long()
    lower, upper = bounds[:-1].unsqueeze(1), bounds[1:].unsqueeze(1)
    u = torch.rand(num, batch_size, generator=generator, dtype=torch.float64, device=device)
    picks = lower + (u * (upper - lower)).floor().long()
    return picks.clamp_(lo, hi - 1)


def _check_grid(grid: torch.Tensor) -> None:
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be the 1-D rollout sigma grid [N + 1] with N >= 1, got shape {tuple(grid.shape)}")
    if not bool((grid[:-1] >= grid[1:]).all()):
        raise ValueError("grid must be descending (from sigma = 1 at the noise end to 0 at the data end)")
    if not bool((grid[:-1] > 0).all()) or float(grid[0]) > 1.0 + 1e-6:
        raise ValueError("grid step sigmas grid[:-1] must lie in (0, 1]; only the final entry may be 0")


def sample_train_sigmas(
    strategy: str,
    num: int,
    batch_size: int,
    *,
    grid: torch.Tensor,
    time_shift: float = 1.0,
    timestep_fraction: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``num`` training sigmas for each of ``batch_size`` samples.

    Args:
        strategy: one of

            * ``uniform``: per sample, stratified ``u_k = (k + U_k) / num`` (k = 0..num-1),
              ``sigma = 1 - timestep_fraction * u``, then the SD3 shift, clamped to
              ``[1e-3, 1]``.
            * ``logit_normal``: per sample, stratified ``u_k`` as above, ``z = Phi^-1(u_k)``,
              ``sigma = 1 - timestep_fraction * (1 - sigmoid(z))`` (logit-normal, mean 0,
              std 1, restricted to the trained fraction), then the SD3 shift and clamp.
            * ``discrete``: per sample, stratified integer picks ``i`` over ``[0, n_max)``,
              ``sigma = grid[i]``, with ``n_max = max(1, int(N * timestep_fraction))``.
            * ``discrete_with_init``: index 0 (the noisiest step) always, plus ``num - 1``
              stratified picks over ``[1, n_max)``.
            * ``discrete_wo_init``: stratified picks over ``[1, n_max)`` (never index 0).

        num: sigmas per sample (>= 1).
        batch_size: number of samples (>= 1).
        grid: rollout sigma grid ``[N + 1]``, descending, last entry 0.
        time_shift: SD3 shift ``s`` applied to the continuous strategies:
            ``sigma' = s * sigma / (1 + (s - 1) * sigma)``. ``s > 1`` pushes sigmas toward
            noise (the SD3 / diffusers convention). NB: Flow-Factory's ``TimeSampler`` applies
            the same formula to the *denoising fraction* ``1 - sigma``, so there ``s > 1``
            pushes toward data; a Flow-Factory ``time_shift`` of ``s`` is not our ``s``.
            The discrete strategies ignore it: ``grid`` is already the (shifted) rollout grid.
        timestep_fraction: in ``(0, 1]``; the trained part of the denoising axis from the
            noise end, i.e. continuous sigmas come from ``[1 - timestep_fraction, 1]`` before
            the shift, discrete ones from the first ``n_max`` steps.
        generator: optional seeded generator, for reproducible draws.

    Returns:
        ``[num, batch_size]`` float32 sigmas in ``(0, 1]`` on ``grid``'s device; each column
        holds one pick per stratum, in random order. If ``num`` exceeds the number of
        candidate grid steps, the discrete strategies repeat steps (allowed: every step is
        still covered).

    Raises:
        ValueError: unknown strategy (lists the choices), ``num < 1``, ``batch_size < 1``,
            ``timestep_fraction`` outside ``(0, 1]``, ``time_shift <= 0``, a malformed grid,
            or ``discrete_wo_init`` with fewer than 2 candidate steps.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown timestep strategy '{strategy}'; choose one of: {', '.join(STRATEGIES)}")
    if num < 1:
        raise ValueError(f"num (training timesteps per sample) must be >= 1, got {num}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 < timestep_fraction <= 1.0:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
    if time_shift <= 0:
        raise ValueError(f"time_shift must be > 0 (1 = no shift), got {time_shift}")
    _check_grid(grid)
    device = generator.device if generator is not None else torch.device("cpu")

    if strategy in ("uniform", "logit_normal"):
        u = _stratified_unit(num, batch_size, generator, device)  # [num, B] in [0, 1)
        if strategy == "uniform":
            sigma = 1.0 - timestep_fraction * u
        else:
            eps = torch.finfo(torch.float64).eps
            z = torch.special.ndtri(u.clamp(eps, 1.0 - eps))
            sigma = 1.0 - timestep_fraction * (1.0 - torch.sigmoid(z))
        sigma = sd3_time_shift(sigma, time_shift).clamp(SIGMA_MIN, 1.0)
        return _permute_columns(sigma, generator).to(device=grid.device, dtype=torch.float32)

    n_steps = grid.numel() - 1
    n_max = max(1, int(n_steps * timestep_fraction + 1e-9))  # + 1e-9: 100 * 0.29 is 28.999...
    if strategy == "discrete":
        idx = _stratified_indices(0, n_max, num, batch_size, generator, device)
    elif strategy == "discrete_with_init":
        first = torch.zeros(1, batch_size, dtype=torch.long, device=device)
        if num == 1:
            idx = first
        elif n_max < 2:  # only step 0 is a candidate: repeat it
            idx = first.expand(num, batch_size)
        else:
            idx = torch.cat([first, _stratified_indices(1, n_max, num - 1, batch_size, generator, device)])
    else:  # discrete_wo_init
        if n_max < 2:
            fix = (
                f"raise timestep_fraction to at least {2 / n_steps:.3g}"
                if n_steps >= 2
                else "use at least 2 rollout steps"
            )
            raise ValueError(
                f"discrete_wo_init needs at least 2 candidate steps, but n_max = max(1, int(N * "
                f"timestep_fraction)) = {n_max} (N = {n_steps}, timestep_fraction = {timestep_fraction}). "
                f"Fix: {fix}, or use strategy 'discrete'."
            )
        idx = _stratified_indices(1, n_max, num, batch_size, generator, device)
    idx = _permute_columns(idx, generator)
    return grid.to(torch.float32)[idx.to(grid.device)]
