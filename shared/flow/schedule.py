"""Sigma (noise-level) schedules for rectified-flow sampling.

Convention used everywhere in ``shared.flow``: ``x_t = (1 - t) * x0 + t * eps`` with ``eps ~ N(0, I)``;
``t`` (called *sigma*) runs from 1 (pure noise) to 0 (data) during sampling, so a step has
``dt = sigma_next - sigma < 0``.

Only ``torch``/``math`` are used; every function is pure.
"""

from __future__ import annotations

import math
import operator

import torch

from shared.seeds import seeded


def time_shift(t, shift: float):
    """SD3-style timestep shift ``t' = shift * t / (1 + (shift - 1) * t)``.

    ``t`` may be a python float or a tensor of any shape (returned with the same type/shape).
    ``shift = 1`` is the identity, ``shift > 1`` spends more steps at high noise (SD3.5 uses 3.0).
    The map is increasing and fixes 0 and 1.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    return shift * t / (1 + (shift - 1) * t)


def exp_time_shift(t, mu: float):
    """FLUX-style exponential shift ``t' = e^mu / (e^mu + (1/t - 1))``.

    Written as ``e^mu t / (e^mu t + 1 - t)`` so that ``t = 0`` maps to 0 without dividing by zero;
    ``t = 1`` maps to 1 and ``mu = 0`` is the identity.  Equivalent to ``time_shift(t, e^mu)``.
    ``t`` may be a float or a tensor.
    """
    scale = math.exp(mu)
    return scale * t / (scale * t + (1 - t))


def resolution_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The resolution-dependent ``mu`` used by FLUX pipelines (diffusers ``calculate_shift``).

    Linear in the number of latent tokens: ``base_shift`` at ``base_seq_len`` tokens, ``max_shift`` at
    ``max_seq_len`` tokens (extrapolated outside that range).  Feed the result to
    ``flow_sigmas(..., mu=mu)`` / ``exp_time_shift``.
    """
    if max_seq_len == base_seq_len:
        raise ValueError("max_seq_len must differ from base_seq_len")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(base_shift + slope * (image_seq_len - base_seq_len))


def flow_sigmas(num_steps: int, shift: float = 1.0, *, mu: float | None = None) -> torch.Tensor:
    """The sampling grid: a float32 tensor of shape ``[num_steps + 1]`` from exactly 1.0 down to exactly 0.0.

    ``linspace(1, 0, num_steps + 1)`` is built in float64, shifted with ``time_shift(., shift)``
    (or ``exp_time_shift(., mu)`` when ``mu`` is given; pass one of the two, not both), then cast to
    float32.  Step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]``.

    This is the FastVideo (DanceGRPO / MixGRPO) grid.  Note that diffusers'
    ``FlowMatchEulerDiscreteScheduler`` for SD3 instead shifts ``linspace(1, ~0.003, num_steps)`` and
    appends 0, so its interior sigmas differ slightly (e.g. 0.960 vs 0.964 at step 1 for 10 steps, shift 3).
    """
    num_steps = operator.index(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    if mu is not None:
        if shift != 1.0:
            raise ValueError(f"pass either shift (got {shift!r}) or mu (got {mu!r}), not both")
        t = exp_time_shift(t, mu)
    else:
        t = time_shift(t, shift)
    sigmas = t.to(torch.float32)
    sigmas[0] = 1.0
    sigmas[-1] = 0.0
    return sigmas


def progressive_window(epoch: int, num_steps: int, size: int, shift_every: int, stride: int = 1,
                       roll_back: bool = False) -> list[int]:
    """MixGRPO's progressive SDE window (Li et al. 2025, ``algorithms.md`` §4.1): the stochastic
    steps of ``epoch`` are ``[l, l + size)``, where the start ``l`` begins at 0 (the noisiest step)
    and moves ``stride`` steps later every ``shift_every`` epochs, ``l <- min(l + stride, T - size)``
    with ``T = num_steps - 2`` (MixGRPO's ``max_timesteps``: the window never reaches the last two
    steps). At ``T - size`` it stays, or with ``roll_back`` the next shift returns it to 0.

    So the starts run ``0, stride, 2 stride, ...`` below ``T - size``, then ``T - size``; the
    ``k``-th shift (``k = epoch // shift_every``) takes the ``k``-th start (the last one from then on,
    or cyclically with ``roll_back``). Returns the window's sorted step indices.
    """
    for name, value in (("size", size), ("shift_every", shift_every), ("stride", stride)):
        if operator.index(value) < 1:
            raise ValueError(f"progressive SDE window: {name} must be >= 1, got {value}")
    last = num_steps - 2 - size
    if last < 0:
        raise ValueError(f"progressive SDE window of {size} steps does not fit {num_steps} steps: MixGRPO's "
                         f"window stays within the first num_steps - 2 = {num_steps - 2}. Fix: a size of at "
                         f"most {num_steps - 2}, or more steps.")
    starts = list(range(0, last, stride)) + [last]
    k = operator.index(epoch) // shift_every
    start = starts[k % len(starts)] if roll_back else starts[min(k, len(starts) - 1)]
    return list(range(start, start + size))


def select_sde_steps(
    candidates: list[int] | None, num: int | None, num_steps: int, seed: int
) -> list[int]:
    """Choose the stochastic ("SDE window") step indices, MixGRPO / Flow-GRPO-Fast style.

    - ``candidates``: allowed step indices; ``None`` means every step but the last,
      ``range(num_steps - 1)`` (the last step ends at sigma = 0 and is never trained).  Every index must lie
      in ``[0, num_steps - 1)``; duplicates are not allowed.
    - ``num``: how many to pick; ``None`` or ``>= len(candidates)`` keeps all of them.
    - ``seed``: a random subset is drawn with ``torch.randperm`` under ``torch.Generator().manual_seed(seed)``,
      so the same seed gives the same steps on every rank.

    Returns a sorted list of ints.
    """
    num_steps = operator.index(num_steps)
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 to have a trainable step, got {num_steps}")
    valid = range(num_steps - 1)
    if candidates is None:
        chosen = list(valid)
    else:
        chosen = [operator.index(i) for i in candidates]
        for i in chosen:
            if i not in valid:
                raise ValueError(
                    f"candidates contains step index {i}, valid range is [0, {num_steps - 1}) "
                    f"for num_steps={num_steps} (the last step is never an SDE step)"
                )
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"candidates contains duplicate step indices: {sorted(chosen)}")
        if not chosen:
            raise ValueError("candidates is empty")
    if num is not None:
        num = operator.index(num)
        if num < 1:
            raise ValueError(f"num must be >= 1 (or None for all candidates), got {num}")
        if num < len(chosen):
            gen = seeded(seed)
            perm = torch.randperm(len(chosen), generator=gen)[:num].tolist()
            chosen = [chosen[j] for j in perm]
    return sorted(chosen)
