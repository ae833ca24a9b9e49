"""Reward models: the contract (:mod:`shared.rewards.base`) and weight-free built-ins.

Importing this package registers the built-ins in :data:`REWARDS`; ``toy_geneval`` (the
toy-world verifier, :mod:`shared.rewards.toy_geneval`) is registered lazily by dotted path and
imported on first lookup.
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

REWARDS.register("toy_geneval", "shared.rewards.toy_geneval.ToyGenEval")

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
