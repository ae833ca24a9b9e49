"""GRPO-style advantages from (possibly several) rewards, grouped by integer group ids.

Conventions:
    * Every tensor is 1-D over the ``N`` samples of one epoch batch, in the same order.
    * ``group_ids`` (int64 ``[N]``) says which samples share a prompt group. Groups are
      identified by these ids only, never by prompt text, so two groups that happen to have
      the same prompt stay separate.
    * A NaN reward means "this reward abstained for this sample". NaNs are left out of every
      statistic (means, stds, counts), and a sample whose aggregated reward is NaN gets
      advantage 0 (no policy gradient in the GRPO family; DiffusionNFT still pulls it halfway, r = 1/2,
      as its official code does for any zero advantage).
    * Statistics are computed in float64; results are float32.
    * Stds are population stds (``unbiased=False``), as in flow_grpo's ``np.std``.

Math (``algorithms.md`` §0, ``flow-factory.md`` §4.1)::

    A_i = (R_i - mean_{j in group(i)} R_j) / (std + eps)

with ``std`` the std of ``i``'s group, or (``global_std=True``, flow_grpo) the std of all
``N`` rewards. Clipping advantages is the loss's job, not this module's.
"""

from __future__ import annotations

from typing import Mapping

import torch

AGGREGATIONS = ("sum", "gdpo")
ZERO_STD = 1e-6  # a group whose aggregated reward std is below this carries no learning signal


def _check_ids(group_ids: torch.Tensor, n: int) -> None:
    if group_ids.ndim != 1 or group_ids.numel() != n:
        raise ValueError(f"group_ids must have shape [{n}] (one id per sample), got {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor (int64), got {group_ids.dtype}")


def _check_rewards(r: torch.Tensor, n: int, name: str) -> None:
    if r.ndim != 1 or r.numel() != n:
        raise ValueError(f"reward '{name}' has shape {tuple(r.shape)}, but group_ids has {n} entries; expected [{n}]")
    if bool(torch.isinf(r).any()):
        raise ValueError(f"reward '{name}' contains inf; rewards must be finite (or NaN to abstain)")


def _group_stats(
    r: torch.Tensor, inverse: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NaN-aware per-group ``(count, mean, population std)``, each ``[G]`` float64.

    ``r`` is float64 ``[N]``; ``inverse[i]`` in ``[0, G)`` is sample ``i``'s group. Groups with
    no valid member get mean and std NaN.
    """
    valid = ~torch.isnan(r)
    v = torch.where(valid, r, torch.zeros_like(r))
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    count = zeros.index_add(0, inverse, valid.double())
    mean = zeros.index_add(0, inverse, v) / count
    dev = torch.where(valid, r - mean[inverse], torch.zeros_like(r))
    std = (zeros.index_add(0, inverse, dev * dev) / count).sqrt()
    return count, mean, std


def _nan_std(r: torch.Tensor) -> torch.Tensor:
    """Population std over the non-NaN entries (NaN if there are none)."""
    v = r[~torch.isnan(r)]
    if v.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return v.std(unbiased=False) if v.numel() > 1 else torch.zeros((), dtype=torch.float64)


def _normalize64(
    r: torch.Tensor, inverse: torch.Tensor, num_groups: int, *, global_std: bool, eps: float,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """Group-centred, std-scaled ``r`` (float64; ``scale_by_std=False``: centred only); NaN stays NaN."""
    _, mean, std = _group_stats(r, inverse, num_groups)
    if not scale_by_std:
        return r - mean[inverse]
    scale = _nan_std(r) if global_std else std[inverse]
    return (r - mean[inverse]) / (scale + eps)


def diversity_scale(adv: torch.Tensor, shaping: torch.Tensor, inverse: torch.Tensor,
                    num_groups: int) -> torch.Tensor:
    """GARDO's diversity-aware advantages: each positive advantage times its sample's diversity
    over its group's mean diversity; negative and zero advantages unchanged.

    Args:
        adv: ``[N]`` float64 advantages.
        shaping: ``[N]`` diversity scores ``d >= 0`` (e.g. the ``diversity`` reward with
            ``reduce: min``, each image's distance to its nearest group member); NaN: no score.
        inverse: ``[N]`` group index in ``[0, G)`` of each sample.
        num_groups: ``G``.

    Returns:
        ``[N]`` float64: ``A_i * d_i / mean_group(d)`` where ``A_i > 0``, else ``A_i``. A sample
        without a score, or in a group whose mean diversity is not positive, keeps ``A_i``.
    """
    d = shaping.detach().to(device=adv.device, dtype=torch.float64)
    _, mean, _ = _group_stats(d, inverse, num_groups)
    factor = d / mean[inverse]
    factor = torch.where(torch.isfinite(factor) & (mean[inverse] > 0), factor, torch.ones_like(factor))
    return torch.where(adv > 0, adv * factor, adv)


def _batch_normalize64(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` over the whole batch, NaN-aware (float64)."""
    valid = x[~torch.isnan(x)]
    if valid.numel() == 0:
        return x
    return (x - valid.mean()) / (_nan_std(x) + eps)


def group_normalize(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, global_std: bool, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO advantages ``A_i = (R_i - mean_group(R)) / (std + eps)``.

    Args:
        rewards: ``[N]`` rewards (NaN = abstained: left out of the statistics, advantage 0).
        group_ids: ``[N]`` int64 group ids.
        global_std: divide by the std of all ``N`` rewards (flow_grpo) instead of the
            sample's own group std (DanceGRPO/MixGRPO). The mean is always per group.
        eps: added to the std.

    Returns:
        ``[N]`` float32 advantages. A group whose rewards are all equal gets 0 everywhere.
    """
    n = rewards.numel()
    _check_ids(group_ids, n)
    _check_rewards(rewards, n, "rewards")
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    r = rewards.detach().to(torch.float64)
    adv = _normalize64(r, inverse.to(r.device), uniq.numel(), global_std=global_std, eps=eps)
    return torch.nan_to_num(adv, nan=0.0).to(torch.float32)


def compute_advantages(
    rewards: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    group_ids: torch.Tensor,
    *,
    aggregation: str = "sum",
    global_std: bool = True,
    eps: float = 1e-4,
    applies: Mapping[str, torch.Tensor] | None = None,
    scale_by_std: bool = True,
    shaping: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages from several named rewards.

    Args:
        rewards: ``{name: [N] rewards}``; NaN entries abstain.
        weights: ``{name: w}``, one weight per reward (no more, no fewer). A reward of weight 0
            is reported in the metrics and left out of the aggregate (its NaN abstains from nothing).
        group_ids: ``[N]`` int64 group ids.
        aggregation:
            * ``sum``: ``R = sum_k w_k r_k``, then :func:`group_normalize` (with
              ``global_std``). A sample missing any reward has ``R = NaN``, so advantage 0.
            * ``gdpo`` (GDPO, Flow-Factory's default): for each reward ``k`` a z-score within
              the group using the group's own std, ``z_k = (r_k - mean_g) / (std_g + eps)``;
              ``S = sum_k w_k z_k``; then over the whole batch ``A = (S - mean(S)) / (std(S) + eps)``.
              ``global_std`` is ignored. Each reward's group statistics leave out only that
              reward's NaN entries. A sample missing any reward has ``S = NaN``, so
              advantage 0, and is left out of the batch statistics.
        global_std: see :func:`group_normalize` (``sum`` only).
        eps: added to every std.
        applies: ``{name: [N] bool}`` for rewards that score only some samples (``rewards[].datasets``
            routing): where False the reward does not apply, and instead of abstaining (NaN) it
            adds nothing to the sample's aggregate (``r_k = 0`` for ``sum``, ``z_k = 0`` for
            ``gdpo``). Routing is by prompt, so a group is either wholly in or wholly out.
        scale_by_std: ``sum`` only; False leaves the group-centred rewards undivided,
            ``A_i = R_i - mean_group(R)`` (GARDO's and Dr. GRPO's std-free advantages: a group
            whose rewards barely differ is not blown up to unit scale).
        shaping: ``[N]`` diversity scores, not a reward: :func:`diversity_scale` applies them to
            the advantages (GARDO's diversity-aware optimization); metric ``diversity_scale_mean``,
            the mean factor over positive advantages.

    Returns:
        ``(advantages [N] float32, metrics)`` with metrics (Python floats):
        ``reward_<name>_mean``, ``reward_<name>_std``, ``reward_<name>_nan_count`` per reward
        (NaN-aware), ``reward_nan_count`` (NaN entries over all rewards),
        ``zero_std_group_fraction`` (fraction of groups whose aggregated reward -- ``R`` for
        ``sum``, ``S`` for ``gdpo`` -- has std < 1e-6 over its valid members; groups with fewer
        than 2 valid members count as zero-std) and ``adv_abs_mean``.

    Raises:
        ValueError: unknown aggregation, no rewards, weights that do not match the rewards,
            or a reward whose length differs from ``group_ids`` (the message names it).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown advantage aggregation '{aggregation}'; choose one of: {', '.join(AGGREGATIONS)}")
    if not rewards:
        raise ValueError("compute_advantages needs at least one reward")
    if set(weights) != set(rewards):
        raise ValueError(
            f"weights must name exactly the rewards. Rewards without a weight: "
            f"{sorted(set(rewards) - set(weights))}; weights without a reward: {sorted(set(weights) - set(rewards))}"
        )
    n = group_ids.numel()
    _check_ids(group_ids, n)
    for name, r in rewards.items():
        _check_rewards(r, n, name)

    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = uniq.numel()
    r64 = {name: r.detach().to(device="cpu", dtype=torch.float64) for name, r in rewards.items()}
    inverse = inverse.cpu()

    metrics: dict[str, float] = {}
    nan_total = 0
    for name, r in r64.items():
        valid = r[~torch.isnan(r)]
        nans = r.numel() - valid.numel()
        nan_total += nans
        metrics[f"reward_{name}_mean"] = float(valid.mean()) if valid.numel() else float("nan")
        metrics[f"reward_{name}_std"] = float(_nan_std(r))
        metrics[f"reward_{name}_nan_count"] = float(nans)
    metrics["reward_nan_count"] = float(nan_total)

    if applies:  # a routed reward adds nothing where it does not apply (a constant 0 normalizes to 0)
        for name, mask in applies.items():
            r64[name] = torch.where(mask.to(device="cpu", dtype=torch.bool), r64[name], torch.zeros_like(r64[name]))
    if not scale_by_std and aggregation != "sum":
        raise ValueError("scale_by_std=False needs aggregation 'sum' (gdpo's per-reward z-scores are its definition)")
    # a weight-0 reward (a train.kl_gate monitor, say) is scored and reported, not trained on: left out
    # here, so its NaN (an abstaining judge) does not make the sample's sum NaN (0 * NaN), zero its
    # advantage and drop it from its group's statistics
    trained = {name: r for name, r in r64.items() if float(weights[name]) != 0.0}
    nothing = torch.zeros(n, dtype=torch.float64)
    if aggregation == "sum":
        aggregated = sum((float(weights[name]) * r for name, r in trained.items()), nothing)
        adv = _normalize64(aggregated, inverse, num_groups, global_std=global_std, eps=eps,
                           scale_by_std=scale_by_std)
    else:  # gdpo
        aggregated = sum(
            (float(weights[name]) * _normalize64(r, inverse, num_groups, global_std=False, eps=eps)
             for name, r in trained.items()), nothing)
        adv = _batch_normalize64(aggregated, eps)
    adv = torch.nan_to_num(adv, nan=0.0)
    if shaping is not None:
        if shaping.ndim != 1 or shaping.numel() != n:
            raise ValueError(f"shaping has shape {tuple(shaping.shape)}, but group_ids has {n} entries; expected [{n}]")
        shaped = diversity_scale(adv, shaping.cpu(), inverse, num_groups)
        positive = adv > 0
        metrics["diversity_scale_mean"] = float((shaped[positive] / adv[positive]).mean()) if positive.any() else 1.0
        adv = shaped

    count, _, group_std = _group_stats(aggregated, inverse, num_groups)
    flat = (count < 2) | ~(group_std >= ZERO_STD)  # ~(>=) also catches NaN
    metrics["zero_std_group_fraction"] = float(flat.double().mean()) if num_groups else 0.0
    metrics["adv_abs_mean"] = float(adv.abs().mean()) if n else 0.0
    return adv.to(device=group_ids.device, dtype=torch.float32), metrics
