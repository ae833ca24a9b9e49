"""Loss math of the trainers (GRPO / GRPO-Guard / DiffusionNFT / AWM / DPO / DGPO) as pure tensor functions.

Nothing in here calls a model, touches an optimizer or reads a config: every function takes tensors the
trainer already has (log-probs, predicted means, velocities, advantages) and returns tensors. That keeps
the math testable against closed forms (``tests/trainer/test_losses.py``) and keeps the trainers thin.

Conventions (shared by every function below)
--------------------------------------------
* Rectified flow: ``x_t = (1 - t) * x0 + t * eps``, velocity target ``v = eps - x0``;
  ``t = 1`` is pure noise, ``t = 0`` is data. ``t`` is the *fraction* in ``[0, 1]`` (diffusers' ``sigma``),
  never the ``1000 * sigma`` timestep the transformer is fed.
* Sampling integrates from ``t = 1`` to ``t = 0``, so ``dt = t_next - t < 0``; functions use ``|dt|``.
* Latent tensors are ``[B, ...]``. "mean over latent dims" / ``mean_d`` is the mean over every non-batch
  dim, giving one value per sample (``[B]``). Per-sample scalars (``std``, ``dt``, ``t``, ``r``) may be a
  python float, a 0-d tensor, a ``[B]`` tensor, or a ``[B, 1, ..., 1]`` tensor.
* Per-step log-probs are **per-element means** of the Gaussian log-density (as in every coupled repo:
  flow_grpo, DanceGRPO, MixGRPO, FlowCPS, Flow-Factory), which is why the PPO clip ranges are ~1e-4.
* Half-precision inputs (fp16/bf16) are upcast to float32 before any arithmetic; float32/float64 inputs are
  kept as they are. AWM's pseudo log-prob is computed (and returned) in float64 like the peer code.
* Metric dicts hold detached 0-d tensors (call ``.item()`` when logging, once per step).

References (see ``shared/reference/algorithms.md`` and ``flow-factory.md`` in the shared docs):
Flow-GRPO (Liu et al. 2025, arXiv 2505.05470), FlowCPS (Wang & Yu 2025, arXiv 2509.05952),
GRPO-Guard (Wang et al. 2025, arXiv 2510.22319), DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117),
AWM (Xue et al. 2025, arXiv 2509.25050), Diffusion-DPO (Wallace et al. 2024, arXiv 2311.12908).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "AWM_WEIGHTINGS",
    "KL_DYNAMICS",
    "awm_log_prob",
    "awm_policy_loss",
    "clip_advantages",
    "clipped_surrogate",
    "group_index",
    "group_sum",
    "guard_log_ratio",
    "guard_log_ratio_from_logprobs",
    "guard_loss_scale",
    "kl_v_based",
    "kl_x_based",
    "mean_d",
    "nft_implicit_velocities",
    "nft_loss",
    "nft_optimality",
    "policy_ratio",
]

#: Canonical AWM weighting names (matching is case-insensitive, e.g. ``"uniform"`` works).
AWM_WEIGHTINGS: tuple[str, ...] = ("Uniform", "t", "t**2", "huber", "ghuber")

#: SDE dynamics understood by :func:`kl_x_based` (matching is case-insensitive, ``_`` == ``-``).
KL_DYNAMICS: tuple[str, ...] = ("Flow-SDE", "Dance-SDE", "CPS")

_HUBER_EPS = 1e-10  # constant inside the sqrt / power of the AWM (g)huber weightings (peer code value)


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------


def _upcast(x: Tensor) -> Tensor:
    """fp16 / bf16 -> float32; float32 / float64 (and non-float) unchanged."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def group_index(group_ids: Tensor, device: torch.device | str | None = None) -> tuple[Tensor, int]:
    """``group_ids [B]`` (any ids) -> each row's group as ``0 .. G-1`` (``inverse [B]``, on ``device``) and ``G``."""
    _, inverse = torch.unique(group_ids.to(device), return_inverse=True)
    return inverse, int(inverse.max()) + 1


def group_sum(x: Tensor, inverse: Tensor, groups: int) -> Tensor:
    """``x [B] -> [B]``: each row gets the sum of ``x`` over its group (``inverse``, ``groups``: :func:`group_index`)."""
    return torch.zeros(groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, x)[inverse]


def mean_d(x: Tensor) -> Tensor:
    """Mean over all non-batch dims: ``[B, ...] -> [B]`` (a ``[B]`` input is returned as is)."""
    if x.dim() == 0:
        raise ValueError("mean_d expects a batched tensor [B, ...], got a 0-d tensor")
    x = _upcast(x)
    if x.dim() == 1:
        return x
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _per_sample(x: float | Tensor, batch: int, *, like: Tensor, name: str) -> Tensor:
    """A per-sample scalar as a ``[B]`` tensor or a 0-d tensor (for a float / single value).

    Accepts a python float, a 0-d tensor, a ``[B]`` tensor or a ``[B, 1, ..., 1]`` tensor.
    """
    if not isinstance(x, Tensor):
        return torch.tensor(float(x), dtype=like.dtype, device=like.device)
    x = _upcast(x)
    if x.numel() == 1:
        return x.reshape(())
    if x.numel() != batch or (x.dim() >= 1 and x.shape[0] != batch):
        raise ValueError(
            f"{name} must be a float, a 0-d tensor, [B] or [B, 1, ...] with B={batch}; got shape {tuple(x.shape)}"
        )
    return x.reshape(batch)


def _expand_to(x: Tensor, ref: Tensor) -> Tensor:
    """Reshape a ``[B]`` (or 0-d) per-sample tensor so it broadcasts against ``ref`` of shape ``[B, ...]``."""
    if x.dim() == 0:
        return x
    return x.reshape(x.shape[0], *([1] * (ref.dim() - 1)))


def _same_shape(*named: tuple[str, Tensor]) -> None:
    shapes = {name: tuple(t.shape) for name, t in named}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}")
    first = named[0][1]
    if first.dim() < 1:
        raise ValueError(f"expected batched tensors [B, ...], got shapes {shapes}")


def _clip_pair(clip_range: float | Sequence[float], name: str) -> tuple[float, float]:
    """``c -> (c, c)``; ``(lo, hi) -> (lo, hi)``. Both are non-negative *distances* (not signed offsets)."""
    if isinstance(clip_range, (int, float)):
        lo = hi = float(clip_range)
    else:
        vals = tuple(float(v) for v in clip_range)
        if len(vals) != 2:
            raise ValueError(f"{name} must be a float or a (lo, hi) pair, got {clip_range!r}")
        lo, hi = vals
    if lo < 0 or hi < 0:
        raise ValueError(
            f"{name} entries are non-negative distances (interval [1-lo, 1+hi] / [-lo, hi]); got {clip_range!r}. "
            "Flow-Factory writes signed offsets like (-1e-4, 1e-4): pass (1e-4, 1e-4) here."
        )
    return lo, hi


# ----------------------------------------------------------------------------------------------------------
# PPO / GRPO pieces (Flow-GRPO, GRPO-Guard, AWM all reuse these)
# ----------------------------------------------------------------------------------------------------------


def policy_ratio(logp_new: Tensor, logp_old: Tensor) -> Tensor:
    """Importance ratio ``exp(logp_new - logp_old)``, elementwise (``[B] -> [B]``).

    Stable form: the difference is taken *before* the exponential (never ``exp(a) / exp(b)``, which
    under/overflows for the large per-step log-densities of low-noise steps), after upcasting fp16/bf16
    to float32 (float64, e.g. AWM's pseudo log-probs, stays float64). No clamping is applied: an inf
    ratio means a real train/rollout mismatch and should surface, not be hidden. Gradient flows through
    ``logp_new``; ``logp_old`` is detached (it is the behaviour policy's stored value).
    """
    if logp_new.shape != logp_old.shape:
        raise ValueError(f"shape mismatch: logp_new {tuple(logp_new.shape)} vs logp_old {tuple(logp_old.shape)}")
    logp_new = _upcast(logp_new)
    logp_old = _upcast(logp_old.detach())
    return torch.exp(logp_new - logp_old)


def clip_advantages(adv: Tensor, adv_clip_range: float | tuple[float, float]) -> Tensor:
    """Clamp advantages to ``[-lo, hi]``; a float ``c`` means ``(c, c)``.

    Flow-GRPO / DiffusionNFT / AWM all use ``adv_clip_max = 5`` (i.e. ``[-5, 5]``). Flow-Factory's
    ``adv_clip_range`` is the signed interval ``(-5, 5)``; here both entries are non-negative magnitudes.
    """
    lo, hi = _clip_pair(adv_clip_range, "adv_clip_range")
    return adv.clamp(min=-lo, max=hi)


def clipped_surrogate(
    ratio: Tensor, adv: Tensor, clip_range: float | tuple[float, float]
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO / GRPO clipped surrogate (Flow-GRPO paper Eq. 4-5, ``scripts/train_sd3.py``).

    ``loss = mean_b max(-A_b r_b, -A_b clamp(r_b, 1 - lo, 1 + hi))``

    Args:
        ratio: ``[B]`` importance ratios ``pi_theta / pi_old`` (see :func:`policy_ratio` / :func:`guard_log_ratio`).
        adv: ``[B]`` advantages (already clipped with :func:`clip_advantages` if wanted); no gradient expected.
        clip_range: ``c`` (symmetric) or ``(lo, hi)``, non-negative distances from 1. flow_grpo's
            ``clip_range`` is the symmetric case; GRPO-Guard's ``(clip_range, highclip_range)`` and
            Flow-Factory's signed ``(c_lo, c_hi)`` map to ``(lo, hi) = (clip_range, highclip_range)`` /
            ``(-c_lo, c_hi)``.

    Returns:
        ``(loss, metrics)``: ``loss`` is a scalar (mean over the batch, the dtype of ``ratio``).
        ``metrics`` (detached): ``clip_frac`` - fraction of samples whose ratio lies outside
        ``[1 - lo, 1 + hi]`` (the clamp is active; flow_grpo's ``clipfrac``), ``clip_frac_low`` /
        ``clip_frac_high`` (the two sides), ``ratio_mean``, ``ratio_min``, ``ratio_max``.

    Gradient: the pessimistic max selects the clamped branch (zero gradient) only when the ratio has
    moved past the bound *in the direction the advantage favours* (A > 0 and r > 1 + hi, or A < 0 and
    r < 1 - lo); everywhere else ``d loss / d r_b = -A_b / B``.
    """
    if ratio.shape != adv.shape or ratio.dim() != 1:
        raise ValueError(f"ratio and adv must both be [B]; got {tuple(ratio.shape)} and {tuple(adv.shape)}")
    lo, hi = _clip_pair(clip_range, "clip_range")
    ratio = _upcast(ratio)
    adv = adv.detach().to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - lo, 1.0 + hi)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        r = ratio.detach()
        low = (r < 1.0 - lo).to(r.dtype)
        high = (r > 1.0 + hi).to(r.dtype)
        metrics = {
            "clip_frac": (low + high).mean(),
            "clip_frac_low": low.mean(),
            "clip_frac_high": high.mean(),
            "ratio_mean": r.mean(),
            "ratio_min": r.min(),
            "ratio_max": r.max(),
        }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# KL regularisers
# ----------------------------------------------------------------------------------------------------------


def _norm_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def kl_x_based(
    mean: Tensor,
    mean_ref: Tensor,
    std: Tensor | float,
    dt: Tensor | float,
    dynamics: str,
) -> Tensor:
    """Per-sample KL proxy between the policy's and the reference's next-step Gaussians (``[B]``).

    Args:
        mean: ``[B, ...]`` policy next-step mean ``mu_theta`` (with gradient).
        mean_ref: ``[B, ...]`` reference next-step mean ``mu_ref`` (frozen model / LoRA disabled).
        std: per-sample step std ``s`` of the Gaussian policy, i.e. ``sigma_t * sqrt|dt|`` for Flow-SDE
            (``eta * sqrt|dt|`` for Dance-SDE). Float, 0-d, ``[B]`` or ``[B, 1, ...]``. Ignored for CPS.
        dt: the step ``t_next - t`` (sign ignored), same accepted shapes. Ignored for CPS.
        dynamics: ``"Flow-SDE"`` / ``"Dance-SDE"`` (Gaussian steps with ``std = sigma_t sqrt|dt|``) or
            ``"CPS"``; case-insensitive, ``_`` accepted for ``-``. ``"ODE"`` has no Gaussian policy and is rejected.

    Returns:
        * SDE dynamics (flow_grpo's *code* version, for which its ``beta`` values were tuned):
          ``mean_d (mu - mu_ref)^2 / (2 sigma_t^2)`` with ``sigma_t^2 = std^2 / |dt|`` the squared diffusion
          coefficient, i.e. ``mean_d (mu - mu_ref)^2 * |dt| / (2 std^2)``.
        * ``"CPS"`` (FlowCPS code): ``mean_d (mu - mu_ref)^2``, no denominator.

    Relation to the paper: the Flow-GRPO paper's closed form is the exact KL between
    ``N(mu, std^2 I)`` and ``N(mu_ref, std^2 I)``, ``KL = ||mu - mu_ref||^2 / (2 std^2)`` (a *sum* over the
    D latent elements, with ``std^2 = sigma_t^2 |dt|``). This function returns ``|dt| / D`` times that:
    it lacks the ``1/|dt|`` factor and uses the per-element mean. Equivalently it is ``|dt|`` times the
    per-element mean of the exact Gaussian KL. Re-tune ``beta`` if you switch to the closed form.
    ``std == 0`` (ODE / final step) gives inf/nan: never call it on deterministic steps.
    """
    _same_shape(("mean", mean), ("mean_ref", mean_ref))
    sq = mean_d((_upcast(mean) - _upcast(mean_ref)) ** 2)
    key = _norm_name(dynamics)
    if key == "cps":
        return sq
    if key in ("flow-sde", "dance-sde"):
        b = mean.shape[0]
        s = _per_sample(std, b, like=sq, name="std")
        d = _per_sample(dt, b, like=sq, name="dt").abs()
        return sq * d / (2.0 * s**2)
    raise ValueError(f"kl_x_based: unknown dynamics {dynamics!r}; choose one of {list(KL_DYNAMICS)}")


def kl_v_based(v: Tensor, v_ref: Tensor) -> Tensor:
    """Velocity-space KL proxy ``mean_d (v - v_ref)^2``, per sample (``[B]``).

    The regulariser of DiffusionNFT (``train.beta * mean||v_theta - v_ref||^2``), AWM (``kl_weight='Uniform'``,
    both the reference and the EMA anchor) and Flow-Factory's ``v-based`` KL. Up to a per-step constant it is the
    Gaussian KL of the induced Flow-SDE step (``dmu`` is proportional to ``dv``); it is an MSE proxy, not a KL.
    """
    _same_shape(("v", v), ("v_ref", v_ref))
    return mean_d((_upcast(v) - _upcast(v_ref)) ** 2)


# ----------------------------------------------------------------------------------------------------------
# GRPO-Guard
# ----------------------------------------------------------------------------------------------------------


def guard_log_ratio(mean_new: Tensor, mean_old: Tensor, prev_sample: Tensor, std: Tensor | float) -> Tensor:
    """GRPO-Guard RatioNorm log-ratio ``log r_tilde = mean_d( eps * (mu_new - mu_old) )`` (``[B]``).

    Args:
        mean_new: ``[B, ...]`` next-step mean ``mu_theta`` recomputed with the current weights (with gradient).
        mean_old: ``[B, ...]`` mean stored at rollout (``prev_sample_mean`` / ``next_latents_mean``).
        prev_sample: ``[B, ...]`` the stored next latent ``x' = mu_old + std * eps``.
        std: the step std ``s = sigma_t sqrt|dt|`` used at rollout; float, 0-d, ``[B]`` or ``[B, 1, ...]``.
            The peer code uses one batch-shared value ``mean(sigma_t) * mean(sqrt|dt|)``.

    ``eps = (x' - mu_old) / s`` is the realised rollout noise. Why: for the per-element-mean Gaussian
    log-prob, ``log r = logp_new - logp_old = mean_d(eps * dmu) / s - mean_d(dmu^2) / (2 s^2)`` with
    ``dmu = mu_new - mu_old``. The second term is always negative (the left-shifted ratio the paper diagnoses)
    and blows up as ``s -> 0``; RatioNorm drops it and multiplies by ``s`` so every step has the same scale.
    Identical to :func:`guard_log_ratio_from_logprobs` (the peer formulation, ``config.rationorm = True`` in
    flow_grpo's ``train_sd3_GRPO_Guard.py`` / Flow-Factory's ``GRPOGuardTrainer``) but needs no log-probs.
    Only meaningful for Gaussian (Flow-SDE / Dance-SDE) steps. Feed ``exp(.)`` to :func:`clipped_surrogate`
    and scale the loss by :func:`guard_loss_scale`.
    """
    _same_shape(("mean_new", mean_new), ("mean_old", mean_old), ("prev_sample", prev_sample))
    mean_old = _upcast(mean_old.detach())
    noise_scaled = _upcast(prev_sample.detach()) - mean_old  # = std * eps
    proj = mean_d(noise_scaled * (_upcast(mean_new) - mean_old))  # = std * mean_d(eps * dmu)
    s = _per_sample(std, mean_new.shape[0], like=proj, name="std")
    return proj / s


def guard_log_ratio_from_logprobs(
    logp_new: Tensor,
    logp_old: Tensor,
    mean_new: Tensor,
    mean_old: Tensor,
    std: Tensor | float,
) -> Tensor:
    """GRPO-Guard RatioNorm log-ratio from log-probs (the peer formulation), ``[B]``.

    ``log r_tilde = s * (logp_new - logp_old) + mean_d((mu_new - mu_old)^2) / (2 s)``

    i.e. ``s * (logp_new - logp_old + bias)`` with ``bias = mean_d(dmu^2) / (2 s^2)`` as in flow_grpo's
    ``train_sd3_GRPO_Guard.py`` (``rationorm``) and Flow-Factory's ``GRPOGuardTrainer``. Valid only when
    ``logp_*`` are **per-element-mean** Gaussian log-densities of the same stored ``x'`` under
    ``N(mu_*, s^2)`` with the same ``s`` for old and new (the ``-log s`` normalisers cancel) - not for
    CPS's unnormalised log-prob. Algebraically equal to :func:`guard_log_ratio`, which avoids the
    cancellation of two large log-densities at low-noise steps and is preferred when ``x'`` is at hand.
    """
    _same_shape(("mean_new", mean_new), ("mean_old", mean_old))
    if logp_new.shape != logp_old.shape:
        raise ValueError(f"shape mismatch: logp_new {tuple(logp_new.shape)} vs logp_old {tuple(logp_old.shape)}")
    sq = mean_d((_upcast(mean_new) - _upcast(mean_old.detach())) ** 2)
    s = _per_sample(std, mean_new.shape[0], like=sq, name="std")
    return s * (_upcast(logp_new) - _upcast(logp_old.detach())) + sq / (2.0 * s)


def guard_loss_scale(dt: Tensor | float) -> Tensor:
    """GRPO-Guard per-step gradient reweighting factor ``1 / |dt|`` (0-d tensor).

    The policy loss of a step is multiplied by this (the paper's ``delta_t = 1/dt`` for flow models) so the
    per-step gradient no longer scales with the step size (``dmu`` is proportional to ``dt * dv``).
    The peer code divides by ``mean(sqrt|dt|)^2`` over the batch; the batch shares one step, so here the mean
    of ``|dt|`` over the batch is used (identical when all entries are equal). ``dt = 0`` gives inf.
    """
    if isinstance(dt, Tensor):
        d = _upcast(dt.detach()).abs().mean()
    else:
        d = torch.tensor(abs(float(dt)), dtype=torch.float32)
    return 1.0 / d


# ----------------------------------------------------------------------------------------------------------
# Flow-DPPO
# ----------------------------------------------------------------------------------------------------------


def gaussian_step_kl(mean: Tensor, mean_old: Tensor, std: Tensor | float) -> Tensor:
    """Per-element KL between two Gaussian steps of one std, ``KL(N(mu, s^2) || N(mu_old, s^2))``,
    averaged over the latent: ``mean_d (mu - mu_old)^2 / (2 s^2)`` (``[B]``).

    Args:
        mean: ``[B, ...]`` the next-step mean under the current weights.
        mean_old: ``[B, ...]`` the rollout's (behaviour policy's) mean; detached.
        std: the step std ``s`` (``StepOutput.std``): float, 0-d or ``[B]``.

    The exact divergence of the per-step policies (Flow-DPPO's trust-region measure, Flow-Factory's
    ``kl_mask_type: x-based``), unlike :func:`kl_x_based`, which is flow_grpo's ``|dt|``-scaled form."""
    _same_shape(("mean", mean), ("mean_old", mean_old))
    sq = mean_d((_upcast(mean) - _upcast(mean_old.detach())) ** 2)
    s = _per_sample(std, mean.shape[0], like=sq, name="std")
    return sq / (2.0 * s ** 2)


def dppo_surrogate(ratio: Tensor, adv: Tensor, kl_old: Tensor, threshold: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow-DPPO's masked policy gradient: ``loss = mean_b keep_b * (-A_b r_b)``.

    ``keep_b`` is 0 only for a sample that has left the trust region (``kl_old_b >= threshold``) *and*
    whose ratio has moved the way its advantage pushes it (``r > 1`` with ``A > 0``, or ``r < 1`` with
    ``A < 0``): the update stops there, while a sample moving against its advantage keeps its
    gradient, which pulls it back. PPO's clip instead bounds the ratio itself, a noisy one-sample
    estimate of the divergence that ``kl_old`` measures exactly.

    Args:
        ratio: ``[B]`` ``pi_theta / pi_old`` of the replayed step (:func:`policy_ratio`).
        adv: ``[B]`` advantages (clipped with :func:`clip_advantages` if wanted); no gradient.
        kl_old: ``[B]`` the divergence from the rollout policy (:func:`gaussian_step_kl`, or the
            velocity-space ``mean_d (v - v_old)^2``); no gradient.
        threshold: the trust region's size (Flow-Factory's ``kl_mask_threshold``, default 1e-6).

    Returns:
        ``(loss, metrics)``; ``metrics`` (detached): ``masked_frac`` (samples with no gradient),
        ``outside_frac`` (samples with ``kl_old >= threshold``), ``kl_old``, ``ratio_mean``,
        ``ratio_min``, ``ratio_max``."""
    if ratio.shape != adv.shape or ratio.shape != kl_old.shape:
        raise ValueError(f"shape mismatch: ratio {tuple(ratio.shape)}, adv {tuple(adv.shape)}, "
                         f"kl_old {tuple(kl_old.shape)}")
    adv = _upcast(adv.detach()).to(ratio.dtype)
    outside = kl_old.detach() >= threshold
    pushed = ((ratio > 1) & (adv > 0)) | ((ratio < 1) & (adv < 0))
    keep = ~(outside & pushed.detach())
    per_sample = torch.where(keep, -adv * ratio, torch.zeros((), dtype=ratio.dtype, device=ratio.device))
    r = ratio.detach()
    metrics = {"masked_frac": (~keep).float().mean(), "outside_frac": outside.float().mean(),
               "kl_old": kl_old.detach().float().mean(), "ratio_mean": r.mean(), "ratio_min": r.min(),
               "ratio_max": r.max()}
    return per_sample.mean(), metrics


# ----------------------------------------------------------------------------------------------------------
# DiffusionNFT
# ----------------------------------------------------------------------------------------------------------


def nft_optimality(adv: Tensor, adv_clip_max: float) -> Tensor:
    """DiffusionNFT optimality probability ``r = clamp(clamp(A, -c, c) / c / 2 + 0.5, 0, 1)`` (``[B]``).

    Official code (``scripts/train_nft_sd3.py``): ``r = clamp(A / 5 / 2 + 0.5, 0, 1)`` with ``adv_clip_max = c = 5``
    (so the paper's ``Z_c`` is ``5 * std``). ``r = 1`` pure positive, ``r = 0`` pure negative, ``A = 0 -> 0.5``.
    """
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    c = float(adv_clip_max)
    a = _upcast(adv.detach()).clamp(-c, c)
    return (a / c / 2.0 + 0.5).clamp(0.0, 1.0)


def nft_implicit_velocities(v_theta: Tensor, v_old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """DiffusionNFT implicit positive / negative velocities (paper §3, Eq. for ``v+`` / ``v-``).

    ``v+ = (1 - beta) v_old + beta v_theta``,  ``v- = (1 + beta) v_old - beta v_theta`` (reflection of ``v+``
    about ``v_old``). ``v_old`` (the frozen sampling / "old" policy) is detached.
    """
    _same_shape(("v_theta", v_theta), ("v_old", v_old))
    v_theta = _upcast(v_theta)
    v_old = _upcast(v_old.detach())
    v_pos = (1.0 - beta) * v_old + beta * v_theta
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    return v_pos, v_neg


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    t: Tensor | float,
    r: Tensor,
    beta: float,
    adv_clip_max: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT policy loss (paper Eq. for L, official ``scripts/train_nft_sd3.py``, Flow-Factory ``nft.py``).

    Args:
        v_theta: ``[B, ...]`` velocity of the trainable policy at ``(x_t, t)`` (with gradient).
        v_old: ``[B, ...]`` velocity of the frozen sampling ("old") policy at the same point (detached here).
        x_t: ``[B, ...]`` forward-noised clean rollout latent ``(1 - t) x0 + t eps``.
        x0: ``[B, ...]`` the clean rollout latent.
        t: per-sample time fraction in ``[0, 1]`` (float, 0-d, ``[B]``, ``[B, 1, ...]``).
        r: ``[B]`` optimality probabilities from :func:`nft_optimality`.
        beta: NFT ``beta`` (> 0; official 1.0, 0.1 for OCR / multi-reward).
        adv_clip_max: ``c`` of :func:`nft_optimality` (official 5); a constant loss scale in the official code.

    Math: ``v+`` / ``v-`` from :func:`nft_implicit_velocities`; ``x0± = x_t - t v±``;
    adaptive weights ``w± = sg(mean_d |x0± - x0|).clamp_min(1e-5)``; ``L± = mean_d (x0± - x0)^2 / w±``;
    ``loss = mean_b( c * (r L+ + (1 - r) L-) / beta )``.
    Since ``x0± - x0 = t (v_target - v±)`` with ``v_target = eps - x0``, ``L+`` is the (self-normalised, x0-space)
    flow-matching loss of ``v+``: positive samples pull ``v+`` toward the target, negative samples pull ``v-``
    toward it, i.e. push ``v_theta`` away. The ``train.beta * kl_v_based(v_theta, v_ref)`` anchor is separate.

    Returns:
        ``(loss, metrics)``; metrics (detached): ``loss_pos`` / ``loss_neg`` (batch means of ``L+`` / ``L-``),
        ``r_mean``.
    """
    _same_shape(("v_theta", v_theta), ("v_old", v_old), ("x_t", x_t), ("x0", x0))
    if beta <= 0:
        raise ValueError(f"nft beta must be > 0, got {beta}")
    b = v_theta.shape[0]
    x_t = _upcast(x_t.detach())
    x0 = _upcast(x0.detach())
    v_pos, v_neg = nft_implicit_velocities(v_theta, v_old, beta)
    tt = _expand_to(_per_sample(t, b, like=v_pos, name="t").detach(), v_pos)
    r = _per_sample(r, b, like=v_pos, name="r").detach()

    def branch(v: Tensor) -> Tensor:
        err = (x_t - tt * v) - x0
        w = mean_d(err.detach().abs()).clamp_min(1e-5)
        return mean_d(err**2) / w

    l_pos = branch(v_pos)
    l_neg = branch(v_neg)
    loss = (float(adv_clip_max) * (r * l_pos + (1.0 - r) * l_neg) / beta).mean()
    metrics = {
        "loss_pos": l_pos.detach().mean(),
        "loss_neg": l_neg.detach().mean(),
        "r_mean": r.mean(),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# AWM
# ----------------------------------------------------------------------------------------------------------


def awm_log_prob(
    v_theta: Tensor,
    target: Tensor,
    t: Tensor | float,
    weighting: str,
    ghuber_power: float = 0.25,
) -> Tensor:
    """AWM pseudo log-prob: a weighted negative flow-matching error per sample (``[B]``, **float64**).

    ``l = mean_d (v_theta - target)^2`` with ``target = eps - x0``, computed in float64 (as the peer code's
    ``compute_log_prob_awm`` / Flow-Factory's ``awm.py``) and returned in float64 so that
    ``exp(logp - logp_old)`` stays exact at ratio ~1; the resulting loss is float64 too (cast if needed).

    ``weighting`` (case-insensitive), ``t`` the time fraction in ``[0, 1]``, ``p = ghuber_power``:

    * ``"Uniform"``: ``-l``
    * ``"t"``: ``-t l``
    * ``"t**2"``: ``-t^2 l``
    * ``"huber"``: ``-t (sqrt(l + 1e-10) - 1e-5)`` (0 at ``l = 0``)
    * ``"ghuber"`` (official default, ``p = 0.25``): ``-(t / p) ((l + 1e-10)^p - (1e-10)^p)``;
      for ``p = 1`` this is ``-t l``; small ``p`` down-weights large errors.

    Used as ``logpi`` in the on-policy ratio ``exp(logp - sg(logp_old))`` (:func:`awm_policy_loss`); with
    ratio 1 the gradient is the advantage-weighted flow-matching gradient (AWM paper §3).
    """
    _same_shape(("v_theta", v_theta), ("target", target))
    key = weighting.strip().lower()
    choices = {w.lower(): w for w in AWM_WEIGHTINGS}
    if key not in choices:
        raise ValueError(f"awm_log_prob: unknown weighting {weighting!r}; choose one of {list(AWM_WEIGHTINGS)}")
    diff = v_theta.to(torch.float64) - target.detach().to(torch.float64)
    l = diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)
    if key == "uniform":
        return -l
    tt = _per_sample(t, v_theta.shape[0], like=l, name="t").detach().to(torch.float64)
    if key == "t":
        return -tt * l
    if key == "t**2":
        return -(tt**2) * l
    if key == "huber":
        return -tt * (torch.sqrt(l + _HUBER_EPS) - _HUBER_EPS**0.5)
    # ghuber
    p = float(ghuber_power)
    if p <= 0:
        raise ValueError(f"ghuber_power must be > 0, got {ghuber_power}")
    return -(tt / p) * ((l + _HUBER_EPS) ** p - _HUBER_EPS**p)


def awm_policy_loss(
    logp_new: Tensor, logp_old: Tensor, adv: Tensor, clip_range: float | tuple[float, float]
) -> tuple[Tensor, dict[str, Tensor]]:
    """AWM policy loss = ``clipped_surrogate(exp(logp_new - sg(logp_old)), A, clip_range)``.

    ``logp_*`` from :func:`awm_log_prob` (old = same weighting under the sampling policy, or simply
    ``logp_new.detach()`` when strictly on-policy, which makes the ratio exactly 1). The regularisers
    (``kl_beta * kl_v_based(v, v_ref)`` and ``ema_kl_beta * kl_v_based(v, v_ema)``) are added by the trainer.
    """
    return clipped_surrogate(policy_ratio(logp_new, logp_old), adv, clip_range)


# ----------------------------------------------------------------------------------------------------------
# Online Diffusion-DPO
# ----------------------------------------------------------------------------------------------------------


def best_worst_pairs(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each group's (best, worst) sample by ``scores [N]`` (advantages or rewards), groups by ``group_ids [N]``.

    Returns ``(winners [P], losers [P], valid [P] bool)``: row indices, one pair per group of at least two
    samples, in order of first appearance; the first of equal scores wins a tie for best and the last
    for worst, and ``valid`` is False where best and worst score the same (no preference to learn).
    Groups of one sample give no pair.
    """
    if scores.ndim != 1 or group_ids.shape != scores.shape:
        raise ValueError(f"scores and group_ids must both be [N], got {tuple(scores.shape)} and {tuple(group_ids.shape)}")
    values, ids = scores.detach().cpu().double(), group_ids.cpu().tolist()
    rows: dict[int, list[int]] = {}
    for i, gid in enumerate(ids):
        rows.setdefault(gid, []).append(i)
    winners, losers, valid = [], [], []
    for members in rows.values():
        if len(members) < 2:
            continue
        member_scores = values[members]
        best = members[int(torch.argmax(member_scores))]
        worst = members[len(members) - 1 - int(torch.argmin(member_scores.flip(0)))]
        winners.append(best)
        losers.append(worst)
        valid.append(bool(values[best] > values[worst]))
    return (torch.tensor(winners, dtype=torch.long), torch.tensor(losers, dtype=torch.long),
            torch.tensor(valid, dtype=torch.bool))


def dpo_loss(err: Tensor, err_ref: Tensor, winners: Tensor, losers: Tensor, valid: Tensor,
             beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO's loss on flow matching (Flow-Factory's ``dpo`` trainer).

    ``err``, ``err_ref [B]``: each sample's mean squared velocity error ``mean_d (v - (eps - x0))^2`` under the
    policy (with gradient) and under the frozen reference, at the same ``(t, eps)`` for a pair's two samples.
    ``winners``, ``losers``, ``valid [P]``: the pairs (:func:`best_worst_pairs`). Per pair
    ``z = -(beta / 2) * ((err_w - err_ref_w) - (err_l - err_ref_l))`` and the loss is ``-log sigmoid(z)``,
    averaged over the ``P`` pairs with invalid pairs (ties) contributing 0. ``z > 0`` when the policy has moved
    toward the winner more than toward the loser, relative to the reference (so ``z = 0`` and the loss is
    ``log 2`` when policy and reference agree).

    Metrics, each over all ``P`` pairs so that equal-size micro-batches average to the epoch's figure:
    ``dpo_accuracy`` (fraction of pairs that are valid and have ``z > 0``; divide by ``dpo_valid_fraction`` for
    the accuracy among valid pairs), ``dpo_margin`` (sum of ``z`` over valid pairs / ``P``), ``dpo_valid_fraction``.
    """
    if err.ndim != 1 or err_ref.shape != err.shape:
        raise ValueError(f"err and err_ref must both be [B], got {tuple(err.shape)} and {tuple(err_ref.shape)}")
    err, err_ref = _upcast(err), _upcast(err_ref).detach()
    winners, losers, valid = winners.to(err.device), losers.to(err.device), valid.to(err.device)
    diff = err - err_ref
    z = -0.5 * beta * (diff[winners] - diff[losers])
    weight = valid.to(z.dtype)
    pairs = max(int(valid.numel()), 1)
    loss = (-torch.nn.functional.logsigmoid(z) * weight).sum() / pairs + 0.0 * err.sum()  # graph even with no pair
    metrics = {"dpo_accuracy": ((z.detach() > 0).to(z.dtype) * weight).sum() / pairs,
               "dpo_margin": (z.detach() * weight).sum() / pairs,
               "dpo_valid_fraction": weight.sum() / pairs}
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# DGPO
# ----------------------------------------------------------------------------------------------------------


def dgpo_loss(dsm: Tensor, ref_dsm: Tensor, adv: Tensor, group_ids: Tensor, beta: float, group_size: int,
              old_dsm: Tensor | None = None, clip_range: float | tuple[float, float] = 1e-4
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """DGPO's group preference loss (Direct Group Preference Optimization; Flow-Factory's ``dgpo`` trainer).

    ``dsm [B]``: each sample's flow-matching loss ``mean_d (v_theta - (eps - x0))^2`` (with gradient);
    ``ref_dsm [B]`` the frozen reference's, ``old_dsm [B]`` the sampling ("old") policy's, at the same
    ``(t, eps)``; ``adv [B]`` advantages (already clipped); ``group_ids [B]``: the micro-batch holds whole
    groups of ``group_size`` samples.

    * Clipping (when ``old_dsm`` is given): ``ratio = exp(old_dsm - dsm)`` (the likelihood ratio of the
      flow-matching pseudo log-prob ``-dsm``); a sample with ``A > 0`` and ``ratio > 1 + hi``, or ``A <= 0``
      and ``ratio < 1 - lo`` (``clip_range`` as distances ``(lo, hi)``, or one number for both) has its loss
      detached: it gives no gradient.
    * Group weight: ``w_g = sigmoid(sum_{i in g} A_i beta (dsm_i - ref_dsm_i) / group_size)`` (detached);
      a group the policy already fits better than the reference where its advantages say so weighs less.
    * Loss: ``mean_i(w_{g(i)} A_i dsm_i)``: lowering the loss of positive samples, raising that of negatives.

    Metrics: ``dgpo_group_weight`` (mean ``w``), ``clip_fraction`` (with ``old_dsm``), ``dsm`` (mean).
    """
    if dsm.ndim != 1 or not (ref_dsm.shape == adv.shape == group_ids.shape == dsm.shape):
        raise ValueError(f"dsm, ref_dsm, adv and group_ids must all be [B], got {tuple(dsm.shape)}, "
                         f"{tuple(ref_dsm.shape)}, {tuple(adv.shape)}, {tuple(group_ids.shape)}")
    dsm, adv = _upcast(dsm), _upcast(adv).detach()
    metrics: dict[str, Tensor] = {}
    used = dsm
    if old_dsm is not None:
        lo, hi = _clip_pair(clip_range, "clip_range")
        ratio = torch.exp(_upcast(old_dsm).detach() - dsm.detach())
        clipped = torch.where(adv > 0, ratio > 1 + hi, ratio < 1 - lo)
        used = torch.where(clipped, dsm.detach(), dsm)
        metrics["clip_fraction"] = clipped.to(dsm.dtype).mean()
    inverse, groups = group_index(group_ids, dsm.device)
    term = adv * beta * (dsm.detach() - _upcast(ref_dsm).detach()) / group_size
    weight = torch.sigmoid(group_sum(term, inverse, groups))
    loss = (weight * adv * used).mean()
    metrics["dgpo_group_weight"] = weight.mean()
    metrics["dsm"] = dsm.detach().mean()
    return loss, metrics
