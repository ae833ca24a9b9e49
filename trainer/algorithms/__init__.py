"""Algorithms, registered by ``train.trainer_type``: grpo, grpo-guard, dppo, nft, awm, dpo, dgpo, crd."""

from trainer.algorithms.base import ALGORITHMS, Algorithm, TrainBatch

for _name, _path in [("grpo", "trainer.algorithms.grpo.GRPO"),
                     ("grpo-guard", "trainer.algorithms.grpo_guard.GRPOGuard"),
                     ("dppo", "trainer.algorithms.dppo.DPPO"),
                     ("nft", "trainer.algorithms.nft.NFT"),
                     ("awm", "trainer.algorithms.awm.AWM"),
                     ("dpo", "trainer.algorithms.dpo.DPO"),
                     ("dgpo", "trainer.algorithms.dgpo.DGPO"),
                     ("crd", "trainer.algorithms.crd.CRD")]:
    if _name not in ALGORITHMS:
        ALGORITHMS.register(_name, _path)

__all__ = ["ALGORITHMS", "Algorithm", "TrainBatch"]
