"""GARDO's gated and adaptive KL (He et al. 2025, arXiv 2512.24138), as flow_grpo's
``scripts/train_sd3_gardo.py`` runs it (``train.kl_gate``).

* **Uncertainty** of each sample of the epoch's global batch (:func:`uncertainty`): its rank under the
  proxy reward minus its mean rank under the auxiliary rewards, ranks over the whole batch with 1 the
  highest score. flow_grpo's code gates the samples with the largest positive gap -- those the proxy
  ranks *below* the auxiliary rewards; flowrl follows the code (the paper's text leaves the sign open).
* **Gate** (:func:`gate_mask`): the gaps above the ``1 - fraction`` quantile of the non-negative ones.
* **Adaptive fraction** (:class:`RiskCompensator`, GARDO's class of that name): the fraction starts at
  0.1; an epoch whose mean non-negative gap exceeds the largest of the last 20 epochs' multiplies it by
  1.1, one below the smallest by 0.9; it stays within ``[0.02, 0.2]``.
* **Reference resets** (:class:`KLGateState`): the KL anchors to a copy of the policy, reset to the
  current weights at the start of an epoch when one of the previous epoch's optimizer steps had a KL
  (its units' mean, averaged over processes) above ``reset_kl``, or when more than ``reset_every``
  epochs passed since the last reset. flow_grpo drops zero-advantage samples before training; flowrl
  keeps them (their policy term is 0), so a step's KL averages over them too.
* Ties in a reward's scores rank in a random order seeded by the run's seed and the epoch.

The state lives in the run's per-epoch metrics (``train/kl_gate/*``) and is rebuilt from them on resume.
"""

from __future__ import annotations

import torch

from shared.seeds import seeded

FRACTION_MIN, FRACTION_MAX, STEP, WINDOW = 0.02, 0.2, 0.1, 20
KL_REFERENCE = "kl_reference"  # the policy's snapshot the gated KL anchors to


def batch_ranks(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[N]`` finite scores -> ranks ``1 .. N`` (1 = the highest). Ties: in a random order drawn from
    ``generator`` (flow_grpo's unstable sort leaves them in no particular order), else in batch order."""
    values = scores.double()
    shuffle = (torch.randperm(len(values), generator=generator) if generator is not None
               else torch.arange(len(values)))
    order = shuffle[torch.sort(values[shuffle], descending=True, stable=True).indices]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1)
    return ranks.double()


def uncertainty(proxy: torch.Tensor, auxiliary: list[torch.Tensor],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``rank(proxy) - mean_k rank(auxiliary_k)`` per sample (``[N]`` float64): positive where the proxy
    ranks the sample lower than the auxiliary rewards do. Ranks are over the samples every one of these
    rewards scored; a sample any of them abstained on (NaN) gets a NaN gap (never gated). The gaps
    sum to 0 over the ranked samples."""
    valid = torch.isfinite(proxy) & torch.stack([torch.isfinite(a) for a in auxiliary]).all(0)
    u = torch.full(proxy.shape, float("nan"), dtype=torch.float64)
    if valid.any():
        u[valid] = (batch_ranks(proxy[valid], generator)
                    - torch.stack([batch_ranks(a[valid], generator) for a in auxiliary]).mean(0))
    return u


def gate_mask(u: torch.Tensor, fraction: float) -> torch.Tensor:
    """``[N]`` bool: ``u`` above the ``1 - fraction`` quantile (linear interpolation, numpy's
    percentile) of its non-negative values -- about ``fraction`` of those (NaN: never)."""
    nonneg = u[u >= 0]
    if nonneg.numel() == 0:
        return torch.zeros_like(u, dtype=torch.bool)
    return u > torch.quantile(nonneg, 1.0 - fraction)


class RiskCompensator:
    """The gated fraction over the epochs (module docstring): :meth:`update` with an epoch's mean
    non-negative gap, then read :attr:`fraction`. ``adaptive=False`` keeps ``base``."""

    def __init__(self, base: float, adaptive: bool = True) -> None:
        self.base, self.adaptive, self.fraction = base, adaptive, base
        self.recent: list[float] = []

    def update(self, mean_gap: float) -> float:
        if self.adaptive:
            if not self.recent:
                self.fraction = self.base
            elif mean_gap > max(self.recent):
                self.fraction *= 1 + STEP
            elif mean_gap < min(self.recent):
                self.fraction *= 1 - STEP
            self.fraction = min(max(self.fraction, FRACTION_MIN), FRACTION_MAX)
        self.recent = (self.recent + [mean_gap])[-WINDOW:]
        return self.fraction


class KLGateState:
    """The gate across epochs: the fraction's history and when the reference was last reset.

    Per epoch: :meth:`reset_due` (before training: reset the reference?), :meth:`mask` (this epoch's
    gate from the global batch's rewards), :meth:`after` (the epoch's mean KL). :meth:`restore` replays
    a resumed run's metrics."""

    def __init__(self, gate) -> None:
        self.cfg = gate
        self.compensator = RiskCompensator(gate.fraction, gate.adaptive)
        self.last_reset, self.pending = 0, False

    def reset_due(self, epoch: int) -> bool:
        """GARDO's rule: after an epoch whose KL exceeded ``reset_kl``, or more than ``reset_every``
        epochs after the last reset (never at epoch 0: the copy is the starting policy)."""
        due = (epoch != 0 and self.pending) or (self.cfg.reset_every is not None
                                                 and epoch - self.last_reset > self.cfg.reset_every)
        if due:
            self.pending, self.last_reset = False, epoch
        return due

    def mask(self, proxy: torch.Tensor, auxiliary: list[torch.Tensor],
             seed: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """The global batch's gate (``[N]`` bool) and its metrics; ``seed`` orders tied scores."""
        u = uncertainty(proxy, auxiliary, seeded(seed))
        nonneg = u[u >= 0]
        mean_gap = float(nonneg.mean()) if nonneg.numel() else 0.0
        fraction = self.compensator.update(mean_gap)
        gate = gate_mask(u, fraction)
        return gate, {"train/kl_gate/fraction": fraction, "train/kl_gate/gated": float(gate.float().mean()),
                      "train/kl_gate/gap_mean": mean_gap}

    def after(self, kl: float | None) -> None:
        """``kl``: the largest process-mean KL of the epoch's optimizer steps (``train/kl_step_max``)."""
        if self.cfg.reset_kl is not None and kl is not None and kl > self.cfg.reset_kl:
            self.pending = True

    def restore(self, history: list[dict]) -> None:
        """Rebuild the state from the per-epoch metrics of the epochs already trained."""
        for i, row in enumerate(history):
            epoch = int(row.get("epoch", i + 1)) - 1  # a row is logged after its epoch: "epoch" counts them
            if row.get("train/kl_gate/reset"):
                self.last_reset, self.pending = epoch, False
            if "train/kl_gate/gap_mean" in row:
                self.compensator.update(row["train/kl_gate/gap_mean"])
            self.after(row.get("train/kl_step_max"))
