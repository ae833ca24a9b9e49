"""The configured reward set of an experiment: build every ``rewards:`` entry, score with all.

Used by the embedded trainer, its evaluation and the distributed reward worker, so all three
build and apply rewards the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from shared.rewards.base import RewardModel, build_reward, score_all


def resolve_device(device: str, default: str | torch.device) -> str:
    """``"auto"`` -> ``default`` (the process's device); anything else as given."""
    return str(default) if device == "auto" else device


def build_rewards(specs, device: str | torch.device) -> dict[str, RewardModel]:
    """``{label: model}`` for a list of ``RewardSpec`` (``device: auto`` -> ``device``)."""
    return {s.label: build_reward(s.reward_model, device=resolve_device(s.device, device),
                                  dtype=s.dtype, **s.options) for s in specs}


def score_specs(rewards: dict[str, RewardModel], specs, images: torch.Tensor, prompts: list[str],
                group_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Score with every configured reward -> ``{label: [N] float32 CPU}`` (NaN = abstain)."""
    return {spec.label: score_all(rewards[spec.label], images, prompts, group_ids,
                                  spec.batch_size).float().cpu()
            for spec in specs}


def spec_dicts(specs) -> list[dict[str, Any]]:
    """Reward specs as plain JSON dicts (what travels in queue messages)."""
    return [s.model_dump(mode="json") for s in specs]
