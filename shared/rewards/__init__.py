"""Reward models: the contract (:mod:`shared.rewards.base`) and weight-free built-ins.

Importing this package registers the built-ins in :data:`REWARDS`; ``toy_geneval`` (the
toy-world verifier, :mod:`shared.rewards.toy_geneval`) and the learned models ``PickScore``,
``PickScore_Rank``, ``CLIP`` (:mod:`shared.rewards.clip_rewards`), ``aesthetic``
(:mod:`shared.rewards.aesthetic`) and ``vlm_judge`` (a served VLM's probability of Yes,
:mod:`shared.rewards.vlm_judge`), ``ocr`` (the quoted text read back, :mod:`shared.rewards.ocr`) and
``rational_rewards_t2i`` / ``_edit`` (a served judge's rubric scores, :mod:`shared.rewards.rational`),
``unifiedreward`` / ``vlm_score`` (a served judge's score on a scale, :mod:`shared.rewards.score_judge`) and
``geneval`` (GenEval's check from row metadata, :mod:`shared.rewards.geneval`), ``hpsv2``
(Human Preference Score v2.1, :mod:`shared.rewards.hps`) and ``imagereward`` (ImageReward v1.0,
:mod:`shared.rewards.image_reward`) and ``diversity`` (distance to the group's other images,
:mod:`shared.rewards.diversity`) and ``videoalign`` (VideoAlign's video reward,
:mod:`shared.rewards.video_align`) are registered lazily by dotted path and imported on first lookup
(names are case-insensitive). A ``reward_model`` that is a dotted path
``package.module.Class`` builds a user's own :class:`RewardModel` subclass.
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
REWARDS.register("toy_shape_quality", "shared.rewards.toy_geneval.ToyShapeQuality")
REWARDS.register("geneval", "shared.rewards.geneval.GenEval")
REWARDS.register("hpsv2", "shared.rewards.hps.HPSv2")
REWARDS.register("imagereward", "shared.rewards.image_reward.ImageReward")
REWARDS.register("diversity", "shared.rewards.diversity.Diversity")
REWARDS.register("videoalign", "shared.rewards.video_align.VideoAlign")
REWARDS.register("pickscore", "shared.rewards.clip_rewards.PickScore")
REWARDS.register("pickscore_rank", "shared.rewards.clip_rewards.PickScoreRank")
REWARDS.register("clip", "shared.rewards.clip_rewards.CLIPScore")
REWARDS.register("aesthetic", "shared.rewards.aesthetic.Aesthetic")
REWARDS.register("remote", "shared.rewards.remote.RemoteReward")
REWARDS.register("vlm_judge", "shared.rewards.vlm_judge.VLMJudge")
REWARDS.register("vllm_evaluate", "shared.rewards.vlm_judge.VLMJudge")  # Flow-Factory's name for it
REWARDS.register("ocr", "shared.rewards.ocr.OCR")
REWARDS.register("rational_rewards_t2i", "shared.rewards.rational.RationalRewardsT2I")
REWARDS.register("rational_rewards_edit", "shared.rewards.rational.RationalRewardsEdit")
REWARDS.register("unifiedreward", "shared.rewards.score_judge.UnifiedReward")
REWARDS.register("vlm_score", "shared.rewards.score_judge.VLMScore")

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
