"""The algorithm interface and registry (``train.trainer_type``).

The loop hands an algorithm one micro-batch of scored rollouts at a time. ``prepare`` runs
once per micro-batch without gradients (draw training timesteps, evaluate the old policy);
``loss`` is then called for each of ``num_units`` units (a trained denoising step for
GRPO-style methods, a training timestep for NFT/AWM), each followed by one backward pass.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from shared.config import Config
from shared.models import Conditioning
from shared.registry import Registry

ALGORITHMS: Registry[type["Algorithm"]] = Registry("trainer_type")


@dataclasses.dataclass
class TrainBatch:
    """One micro-batch of scored samples (``B`` rows; ``S`` recorded SDE steps)."""

    cond: Conditioning
    advantages: torch.Tensor  # [B]
    final_latents: torch.Tensor  # [B, ...]
    sigmas: torch.Tensor  # [N + 1] rollout grid as run (train.ode_tail: fewer points after the last SDE step)
    sde_steps: list[int]  # step indices recorded in the columns of the tensors below
    latents: torch.Tensor  # [B, S, ...]
    next_latents: torch.Tensor  # [B, S, ...]
    log_probs: torch.Tensor  # [B, S]
    stds: torch.Tensor  # [B, S]
    means: torch.Tensor | None  # [B, S, ...]
    seed: int  # for the training noise / timesteps of this micro-batch
    group_ids: torch.Tensor | None = None  # [B] CPU int64 global group ids (group_shared_noise)
    epoch_seed: int = 0  # shared by the micro-batches of one inner epoch (group_shared_noise)
    kl_gate: torch.Tensor | None = None  # [B] bool: the samples the KL term applies to (train.kl_gate)

    @property
    def size(self) -> int:
        return self.advantages.shape[0]


class Algorithm(ABC):
    """Base class. Subclasses register with ``@ALGORITHMS.register("name")``."""

    #: rollouts must be stochastic and record per-step log-probs
    needs_log_probs: ClassVar[bool] = False
    #: also record the per-step Gaussian means (GRPO-Guard, DPPO)
    keep_means: ClassVar[bool] = False
    #: named copies of the trainable weights the :class:`~trainer.policy.Policy` keeps for this
    #: algorithm (blended in :meth:`after_epoch`, checkpointed); "sampling" is what rollouts use
    snapshots: tuple[str, ...] = ()

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.t = cfg.train

    @abstractmethod
    def num_units(self, num_sde_steps: int) -> int:
        """Backward passes per micro-batch."""

    def prepare(self, batch: TrainBatch, policy: Any) -> dict[str, Any]:
        """No-grad per-micro-batch precompute (default: nothing)."""
        return {}

    def train_order(self, data: Any, generator: torch.Generator) -> torch.Tensor | None:
        """The rows of this process's epoch (:class:`~trainer.collect.EpochData`) to train, in
        order, cut into micro-batches of ``BatchGeometry.train_micro_batch``; None (the default):
        every row, shuffled with ``generator``. An algorithm that returns a subset declares its
        size in :class:`~shared.config.BatchGeometry` (``train_samples_per_rank``)."""
        return None

    def after_epoch(self, policy: Any, step: int) -> dict[str, float]:
        """After an epoch's optimizer steps (``step`` done in all), before the new weights are
        published: update the algorithm's snapshots; returns metrics to log (default: none)."""
        return {}

    def host_sigmas(self, batch: TrainBatch) -> torch.Tensor:
        """``batch.sigmas`` on the host. An epoch's micro-batches share one grid tensor (on the
        model's device), so it is read back once per epoch, not per micro-batch."""
        if getattr(self, "_grid", None) is not batch.sigmas:  # holding it keeps its identity unique
            self._grid, self._host_grid = batch.sigmas, batch.sigmas.detach().to("cpu", torch.float32)
        return self._host_grid

    @abstractmethod
    def loss(self, batch: TrainBatch, unit: int, state: dict[str, Any],
             policy: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss for ``unit`` and its metrics (detached 0-d tensors or floats; the loop sums them on
        the device and reads them back once per epoch)."""


ALGORITHMS.base = Algorithm  # a dotted trainer_type must name a subclass


def expand(value: torch.Tensor, batch: int) -> torch.Tensor:
    """A 0-d sigma -> ``[B]``."""
    return value.reshape(()).expand(batch)
