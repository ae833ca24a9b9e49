"""One stochastic (or deterministic) sampling step of a rectified-flow model, with its Gaussian log-prob.

Convention: ``x_t = (1 - t) x0 + t eps``, ``eps ~ N(0, I)``, sigma = t runs from 1 (noise) to 0 (data),
velocity ``v = eps - x0``, ``dt = sigma_next - sigma < 0``, Euler ODE step ``x + v * dt``.
Identities used below: ``x0_hat = x - sigma v``, ``eps_hat = x + (1 - sigma) v`` and the score
``grad log p_t(x) = -eps_hat / sigma``.

Every step is a Gaussian policy ``pi(x' | x) = N(mean, std^2 I)`` (std = 0 for the ODE):

- ``"ODE"``: ``mean = x + v dt``, std 0.
- ``"Flow-SDE"`` (Flow-GRPO, Liu et al. 2025): Euler-Maruyama on the marginal-preserving reverse SDE
  ``dx = [v + g^2 / (2 sigma) * eps_hat] dt + g dw`` with ``g = a * sqrt(sigma / (1 - sigma))``,
  ``a = noise_level``.  At ``sigma = 1`` the denominator uses ``sigma_next`` instead (flow_grpo uses the
  scheduler's second grid point, which is ``sigma_next`` at step 0), so step 0 has std exactly ``a``.
  ``std = g * sqrt(-dt)``.
- ``"Dance-SDE"`` (DanceGRPO, Xue et al. 2025): the same SDE with a constant ``g = eta = noise_level``.
- ``"CPS"`` (coefficients-preserving sampling, Wang & Yu 2025 / FlowCPS): with ``s = sigma_next sin(eta pi/2)``,
  ``mean = (1 - sigma_next) x0_hat + sigma_next cos(eta pi/2) eps_hat`` (the paper writes the second
  coefficient as ``sqrt(sigma_next^2 - s^2)``; identical), ``std = s``.  The deterministic and injected
  noise add up to exactly ``sigma_next^2`` of variance.  Requires ``eta in [0, 1]``.

``noise_level == 0`` turns every dynamics into the exact ODE step.

Log-probs (shape ``[B]``, float32):

- Flow-SDE / Dance-SDE (and CPS with ``cps_log_prob="gaussian"``): the per-element Gaussian log-density
  ``-(x' - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)`` reduced over the non-batch dims with
  ``log_prob_reduction``: ``"mean"`` (default; what flow_grpo, DanceGRPO and Flow-Factory do, hence their
  tiny PPO clip ranges ~1e-4) or ``"sum"`` (the true joint log-density).
- CPS with ``cps_log_prob="unnormalized"`` (default, as FlowCPS / flow_grpo ``sde_type='cps'``):
  ``-reduce((x' - mean)^2)`` with no constants, i.e. the true per-element log-density times ``2 s^2`` plus a
  constant.  It down-weights late low-noise steps; clip ranges need retuning (upstream uses 1e-5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DYNAMICS = ("Flow-SDE", "Dance-SDE", "CPS", "ODE")
LOG_PROB_REDUCTIONS = ("mean", "sum")
CPS_LOG_PROBS = ("unnormalized", "gaussian")

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """Result of :func:`sde_step`.

    prev_sample: ``[B, ...]`` the next latent ``x_{t+dt}``, dtype of ``x`` (the given ``prev_sample`` when replaying).
    mean:        ``[B, ...]`` float32, the Gaussian mean ``mu_theta``.
    std:         ``[B]`` float32, per-sample step std (0 for the ODE / ``noise_level == 0``).
    log_prob:    ``[B]`` float32, or ``None`` for the ODE / ``noise_level == 0``.
    noise:       ``[B, ...]`` float32, ``(prev_sample - mean) / std`` -- the standardized noise actually
                 realized (0 where a sample's std is 0), or ``None`` for the ODE / ``noise_level == 0``.
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None
    noise: torch.Tensor | None


def reduce_over_latent(t: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce ``[B, ...]`` to ``[B]`` over every non-batch dim with ``"mean"`` or ``"sum"``."""
    if reduction not in LOG_PROB_REDUCTIONS:
        raise ValueError(f"log_prob_reduction must be one of {LOG_PROB_REDUCTIONS}, got {reduction!r}")
    if t.ndim <= 1:
        return t
    dims = tuple(range(1, t.ndim))
    return t.mean(dim=dims) if reduction == "mean" else t.sum(dim=dims)


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a ``[B]`` tensor as ``[B, 1, ..., 1]`` to broadcast against ``like`` (``[B, ...]``)."""
    return value.reshape(value.shape[0], *([1] * (like.ndim - 1)))


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Isotropic Gaussian log-density of ``x`` under ``N(mean, std^2)``, reduced to ``[B]``.

    ``x``, ``mean``: ``[B, ...]``; ``std``: ``[B]`` (one std per sample) or anything broadcastable to ``x``.
    Computed in (at least) float32.  ``reduction`` is ``"mean"`` (per-element average, the RL repos'
    convention) or ``"sum"`` (joint log-density).  A zero std gives -inf/nan: the step has no density.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, mean, std = x.to(dtype), mean.to(dtype), std.to(dtype)
    if std.ndim == 1 and x.ndim > 1 and std.shape[0] == x.shape[0]:
        std = _per_sample(std, x)
    elementwise = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return reduce_over_latent(elementwise, reduction)


def _sigma_vector(value, name: str, x: torch.Tensor) -> torch.Tensor:
    """float/0-d/[B] sigma -> float32 ``[B]`` on x's device."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    batch = x.shape[0]
    if t.numel() == 1:
        return t.reshape(1).expand(batch)
    if t.ndim == 1 and t.shape[0] == batch:
        return t
    raise ValueError(f"{name} must be a float, a 0-d tensor or a [B]={batch} tensor, got shape {tuple(t.shape)}")


def _check_args(x, v, sigma, sigma_next, dynamics, noise_level, log_prob_reduction, cps_log_prob, check_sigmas=True):
    if dynamics not in DYNAMICS:
        raise ValueError(f"dynamics must be one of {DYNAMICS}, got {dynamics!r}")
    if log_prob_reduction not in LOG_PROB_REDUCTIONS:
        raise ValueError(
            f"log_prob_reduction must be one of {LOG_PROB_REDUCTIONS}, got {log_prob_reduction!r}"
        )
    if cps_log_prob not in CPS_LOG_PROBS:
        raise ValueError(f"cps_log_prob must be one of {CPS_LOG_PROBS}, got {cps_log_prob!r}")
    if not (noise_level >= 0 and math.isfinite(noise_level)):
        raise ValueError(f"noise_level must be finite and >= 0, got {noise_level!r}")
    if dynamics == "CPS" and noise_level > 1:
        raise ValueError(f"noise_level (CPS eta) must be in [0, 1], got {noise_level!r}")
    if not (x.is_floating_point() and x.ndim >= 1):
        raise ValueError(f"x must be a floating tensor of shape [B, ...], got {x.dtype} {tuple(x.shape)}")
    if v.shape != x.shape:
        raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    if not check_sigmas:
        return
    if bool((sigma_next > sigma).any()):
        raise ValueError(f"sigma_next must be <= sigma (sampling goes 1 -> 0), got sigma={sigma}, sigma_next={sigma_next}")
    if bool((sigma > 1).any()) or bool((sigma_next < 0).any()):
        raise ValueError(f"sigma and sigma_next must lie in [0, 1], got sigma={sigma}, sigma_next={sigma_next}")


def check_sigma_grid(sigmas: torch.Tensor, steps, dynamics: str) -> None:
    """Check once, on the host, what :func:`sde_step` checks per call: ``sigmas`` (``[N + 1]``)
    descends within [0, 1], and each step ``i`` in ``steps`` taken with ``dynamics`` can be (Flow-SDE /
    Dance-SDE: ``sigmas[i] > 0``; Flow-SDE: ``sigma_next < 1`` where ``sigma = 1``). Raises the
    :class:`ValueError` that :func:`sde_step` would raise at that step."""
    grid = sigmas.detach().to("cpu", torch.float32)
    x = torch.zeros(1)
    for i in range(len(grid) - 1):
        sde_step(x, x, grid[i], grid[i + 1], dynamics=dynamics if i in steps else "ODE",
                 noise_level=1.0 if i in steps and dynamics != "ODE" else 0.0)


def _sde_mean(x, v, sigma, dt, g):
    """Euler-Maruyama mean of the reverse SDE ``dx = [v + g^2/(2 sigma) (x + (1 - sigma) v)] dt + g dw``.

    Equals flow_grpo's ``x (1 + g^2 dt/(2 sigma)) + v (1 + g^2 (1 - sigma)/(2 sigma)) dt`` and DanceGRPO's
    ``x + (v + 0.5 eta^2 (x + (1 - sigma) v)/sigma) dt`` (all per-sample factors are ``[B, 1, ...]``).
    """
    return x + (v + g**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt


def _sigma_hat(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Flow-SDE's sigma in ``1 / (1 - sigma)``: flow_grpo uses the next grid point at sigma = 1 to
    avoid dividing by zero."""
    return torch.where(sigma >= 1, sigma_next, sigma)


def _diffusion(sigma: torch.Tensor, sigma_next: torch.Tensor, dynamics: str,
               noise_level: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(g, std)`` of one step per sample (``[B]`` each; ``g`` is None for CPS): the SDE's diffusion
    coefficient and the step's transition std (module docstring)."""
    if dynamics == "CPS":
        return None, sigma_next * math.sin(noise_level * math.pi / 2)
    if dynamics == "Flow-SDE":
        g = noise_level * torch.sqrt(sigma / (1 - _sigma_hat(sigma, sigma_next)))
    else:
        g = torch.full_like(sigma, float(noise_level))
    return g, g * torch.sqrt(sigma - sigma_next)


def noise_aware_weights(sigmas: torch.Tensor, dynamics: str, noise_level: float) -> torch.Tensor:
    """TempFlow-GRPO's noise-aware policy weights (He et al. 2025, Eq. 7-8 as re-implemented): one
    weight per step of the grid, ``w_t = s_t / mean_u s_u`` with ``s_t`` the step's transition std
    (``sigma_t sqrt(|dt|)`` in the paper's notation; Flow-SDE: ``a sqrt(t / (1 - t)) sqrt(|dt|)``,
    Dance-SDE: ``eta sqrt(|dt|)``, CPS: ``t_next sin(eta pi / 2)``).

    Flow-GRPO's per-step score-function gradient scales like ``sqrt(|dt|) / sigma_t`` times a factor
    near 1, so high-noise steps weigh little; multiplying their loss by ``w_t`` evens that out.

    Args:
        sigmas: ``[T + 1]`` the rollout's grid, 1 -> 0.
    Returns:
        ``[T]`` float32 weights with mean 1 (all 1 on a uniform grid under Dance-SDE).
    Raises:
        ValueError: ODE dynamics or ``noise_level == 0`` (no step is stochastic).
    """
    if dynamics not in DYNAMICS:
        raise ValueError(f"unknown dynamics {dynamics!r}; choose one of {DYNAMICS}")
    if dynamics == "ODE" or noise_level == 0:
        raise ValueError("noise-aware weights need stochastic steps: use an SDE dynamics with noise_level > 0.")
    grid = sigmas.detach().double().cpu()
    _, std = _diffusion(grid[:-1], grid[1:], dynamics, noise_level)
    return (std / std.mean()).float()


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    *,
    dynamics: str,
    noise_level: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    log_prob_reduction: str = "mean",
    cps_log_prob: str = "unnormalized",
    check_sigmas: bool = True,
) -> StepOutput:
    """Take one step from ``sigma`` to ``sigma_next`` (see the module docstring for the dynamics).

    Args:
        x, v: ``[B, ...]`` latent and predicted velocity, any float dtype; the math runs in float32.
        sigma, sigma_next: python floats, 0-d tensors or ``[B]`` tensors (per-sample), broadcast over the
            non-batch dims; ``0 <= sigma_next <= sigma <= 1``.  Flow-SDE / Dance-SDE need ``sigma > 0``.
        dynamics: one of ``DYNAMICS``.
        noise_level: ``a`` (Flow-SDE), ``eta`` (Dance-SDE) or ``eta in [0, 1]`` (CPS); 0 gives the ODE step.
        noise: optional ``[B, ...]`` standard-normal draw used instead of ``torch.randn`` (rollout only).
        prev_sample: replay mode (training): do not sample, score this stored next latent against the
            freshly computed mean.  For the ODE / ``noise_level == 0`` it is returned unchanged.
        generator: ``torch.Generator`` for the noise draw when ``noise`` is None.
        log_prob_reduction: ``"mean"`` (default) or ``"sum"`` over the non-batch dims.
        cps_log_prob: ``"unnormalized"`` (default, FlowCPS) or ``"gaussian"``; only used by CPS.
        check_sigmas: check the sigma values (order, range, ``sigma > 0`` for the SDEs). Per-sample
            sigma tensors on a GPU are read back to the host for it (a sync per call), so loops pass
            ``False`` after checking their whole grid once on the host (:func:`check_sigma_grid`).

    In rollout mode the sample ``mean + std * noise`` is cast to ``x.dtype`` *before* its log-prob is taken,
    so replaying the stored (cast) latent later reproduces the same log-prob.

    Note: with ``check_sigmas`` (the default), validating per-sample sigma tensors reads them back to
    the host (one small sync per call).
    """
    sigma_b = _sigma_vector(sigma, "sigma", x)
    sigma_next_b = _sigma_vector(sigma_next, "sigma_next", x)
    _check_args(x, v, sigma_b, sigma_next_b, dynamics, noise_level, log_prob_reduction, cps_log_prob, check_sigmas)
    if prev_sample is not None and prev_sample.shape != x.shape:
        raise ValueError(f"prev_sample must have the shape of x {tuple(x.shape)}, got {tuple(prev_sample.shape)}")
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")

    xf, vf = x.float(), v.float()
    s, s_next = _per_sample(sigma_b, x), _per_sample(sigma_next_b, x)
    dt = s_next - s

    if dynamics == "ODE" or noise_level == 0:
        mean = xf + vf * dt
        out = prev_sample if prev_sample is not None else mean.to(x.dtype)
        return StepOutput(out, mean, torch.zeros_like(sigma_b), None, None)

    if dynamics in ("Flow-SDE", "Dance-SDE"):
        if check_sigmas and bool((sigma_b <= 0).any()):
            raise ValueError(f"sigma must be > 0 for {dynamics} (the score divides by sigma), got {sigma}")
        if check_sigmas and dynamics == "Flow-SDE" and bool((_sigma_hat(sigma_b, sigma_next_b) >= 1).any()):
            raise ValueError("Flow-SDE cannot take a zero-length step at sigma = 1 (sigma_next must be < 1)")
        g_b, std_b = _diffusion(sigma_b, sigma_next_b, dynamics, noise_level)
        mean = _sde_mean(xf, vf, s, dt, _per_sample(g_b, x))
    else:  # CPS
        angle = noise_level * math.pi / 2
        x0_hat = xf - s * vf
        eps_hat = xf + (1 - s) * vf
        _, std_b = _diffusion(sigma_b, sigma_next_b, dynamics, noise_level)
        mean = (1 - s_next) * x0_hat + (s_next * math.cos(angle)) * eps_hat

    std = _per_sample(std_b, x)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=x.device)
        prev_sample = (mean + std * noise.float()).to(x.dtype)
    target = prev_sample.float()

    positive = std > 0
    realized = torch.where(positive, (target - mean) / torch.where(positive, std, 1.0), 0.0)
    if dynamics == "CPS" and cps_log_prob == "unnormalized":
        log_prob = -reduce_over_latent((target - mean) ** 2, log_prob_reduction)
    else:
        log_prob = gaussian_log_prob(target, mean, std_b, log_prob_reduction)
    return StepOutput(prev_sample, mean, std_b, log_prob, realized)
