"""The deterministic tail of a rollout after its last SDE step, on fewer steps (MixGRPO-Flash).

Nothing is trained after a rollout's last stochastic step: those steps only carry the sample to a
clean image for the reward. MixGRPO-Flash (Li et al. 2025, ``dpm_apply_strategy: post``) runs them on
a coarser grid with a second-order solver. Here :func:`tail_grid` coarsens the grid after the last SDE
step and :func:`dpm_solver_pp_step` is the multistep DPM-Solver++ (order 2, "midpoint" form, Lu et al.
2022) for the flow ``x_t = (1 - t) x0 + t eps``, i.e. ``alpha_t = 1 - t``, ``sigma_t = t`` and
``lambda_t = log((1 - t) / t)``, in data (``x0``) prediction ``x0 = x - t v``.

Convention as :mod:`shared.flow`: sigma (= t) goes 1 -> 0. Tensors: any shape, sigmas are Python
floats (one grid for the whole batch).
"""

from __future__ import annotations

import math

import torch


def tail_grid(sigmas: torch.Tensor, last_sde: int, ratio: float) -> torch.Tensor:
    """The grid with its ``n = N - last_sde - 1`` steps after step ``last_sde`` cut to
    ``max(1, floor(ratio * (n + 1)) - 1)``, MixGRPO-Flash's count (``dpm_post_compress_ratio`` scales
    the tail's ``n + 1`` grid points; where that leaves none, MixGRPO stops short of sigma 0 and this
    keeps one step), at evenly spaced grid points by index (the first and 0 kept; MixGRPO rebuilds
    an evenly spaced SD3-shifted grid instead, which is not every family's schedule). Steps up to
    ``last_sde`` (and so every SDE step and its sigmas) are unchanged.

    Args:
        sigmas: ``[N + 1]`` descending grid, 1 -> 0.
        last_sde: index of the last stochastic step, ``0 <= last_sde < N``.
        ratio: in ``(0, 1]``; 1 returns ``sigmas`` itself.
    Returns:
        ``[last_sde + 2 + m]`` grid (``m`` kept tail steps).
    """
    n_steps = sigmas.shape[0] - 1
    if not 0 <= last_sde < n_steps:
        raise ValueError(f"last SDE step {last_sde} is not a step of a {n_steps}-step grid")
    if not 0 < ratio <= 1:
        raise ValueError(f"tail compress ratio must be in (0, 1], got {ratio}")
    tail = n_steps - last_sde - 1  # steps after the last SDE step
    keep = max(1, math.floor(ratio * (tail + 1)) - 1) if tail else 0
    if keep >= tail:
        return sigmas
    points = torch.linspace(last_sde + 1, n_steps, keep + 1).round().long()
    return torch.cat([sigmas[: last_sde + 1], sigmas[points]])


def _lam(sigma: float) -> float:
    """``lambda = log(alpha / sigma) = log((1 - sigma) / sigma)`` (``-inf`` at 1, ``inf`` at 0)."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log((1.0 - sigma) / sigma)


def dpm_solver_pp_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float,
                       x0_prev: torch.Tensor | None = None, sigma_prev: float | None = None) -> torch.Tensor:
    """One multistep DPM-Solver++ step from ``sigma`` to ``sigma_next < sigma``.

    First order (DDIM in data prediction)::

        x' = (s'/s) x - a' (e^{-h} - 1) x0 = (s'/s) x + (a' - s' a / s) x0,   h = lambda' - lambda

    Second order ("midpoint"), with the previous step's prediction ``x0_prev`` made at
    ``sigma_prev``::

        x' += -1/2 a' (e^{-h} - 1) D1,   D1 = (x0 - x0_prev) h / (lambda - lambda_prev)

    It falls back to first order without a previous prediction, from ``sigma_prev = 1`` (where
    ``lambda = -inf``) and on the last step to ``sigma_next = 0`` (there ``x' = x0``), as diffusers'
    ``lower_order_final``.

    Args:
        x: ``[...]`` state at ``sigma``; ``x0``: its data prediction ``x - sigma v``.
    Returns:
        the state at ``sigma_next`` (the dtype of ``x``).
    """
    if not 0.0 <= sigma_next < sigma <= 1.0:
        raise ValueError(f"a DPM-Solver++ step needs 0 <= sigma_next < sigma <= 1, got {sigma} -> {sigma_next}")
    if sigma_next == 0.0:
        return x0.to(x.dtype)
    a, a_next = 1.0 - sigma, 1.0 - sigma_next
    coef = a_next - sigma_next * a / sigma  # = -a' (e^{-h} - 1)
    out = (sigma_next / sigma) * x.float() + coef * x0.float()
    if x0_prev is not None and sigma_prev is not None and sigma_prev < 1.0:
        h = _lam(sigma_next) - _lam(sigma)
        h0 = _lam(sigma) - _lam(sigma_prev)
        out = out + 0.5 * coef * (h / h0) * (x0.float() - x0_prev.float())
    return out.to(x.dtype)
