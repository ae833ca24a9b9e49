"""A reward that reads dataset row metadata (``RewardModel.metadata``), loaded by dotted path in
tests: each sample's reward is its row's ``target`` column (NaN, abstain, for a row without one),
so a test can tell that every sample reached the reward with its own row's metadata."""

from __future__ import annotations

import torch

from shared.rewards.base import RewardModel


class RowTarget(RewardModel):
    kind = "pointwise"
    metadata = True

    seen: list[dict] = []  # every metadata dict scored in this process, in order

    def score(self, images: torch.Tensor, prompts: list[str], metadata=None) -> torch.Tensor:
        RowTarget.seen.extend(metadata)
        return torch.tensor([float(m.get("target", float("nan"))) for m in metadata])

    def details(self, images: torch.Tensor, prompts: list[str], metadata=None) -> dict[str, torch.Tensor]:
        return {"has_target": torch.tensor([float("target" in m) for m in metadata])}


class ImageWidth(RewardModel):
    """Each image's width / 100: shows at what resolution a sample was drawn."""

    kind = "pointwise"

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.full((images.shape[0],), images.shape[-1] / 100)
