"""Algorithms, registered by ``train.trainer_type``: grpo, grpo-guard, dppo, nft, awm, dpo, dgpo, crd."""

from shared.config import TRAINER_CLASSES
from trainer.algorithms.base import ALGORITHMS, Algorithm, TrainBatch

for _name, _path in TRAINER_CLASSES.items():
    if _name not in ALGORITHMS:
        ALGORITHMS.register(_name, _path)

__all__ = ["ALGORITHMS", "Algorithm", "TrainBatch"]
