"""Reward models: the contract (:mod:`shared.rewards.base`) and weight-free built-ins.

Importing this package registers the built-ins in :data:`REWARDS`.
"""

from shared.rewards.base import (
    KINDS,
    REWARDS,
    RewardModel,
    RewardOutputError,
    build_reward,
    score_all,
)
from shared.rewards.builtin import (
    Brightness,
    JpegCompressibility,
    JpegIncompressibility,
    PairwiseBrightness,
)

__all__ = [
    "KINDS",
    "REWARDS",
    "RewardModel",
    "RewardOutputError",
    "build_reward",
    "score_all",
    "Brightness",
    "JpegCompressibility",
    "JpegIncompressibility",
    "PairwiseBrightness",
]
