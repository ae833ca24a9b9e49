"""``train.group_shared_noise``: the decoupled trainers (NFT, AWM) re-noise every sample of a
group with the group's own training sigmas and noise, the same however the epoch is cut into
micro-batches; without it each sample draws its own."""

from __future__ import annotations

import pytest
import torch

from shared.flow import flow_sigmas
from tests.helpers.tiny import tiny_config
from trainer.algorithms import ALGORITHMS, TrainBatch


def batch(groups: list[int], x0: torch.Tensor, *, seed: int = 3, epoch_seed: int = 7,
          with_groups: bool = True) -> TrainBatch:
    n = len(groups)
    empty = torch.zeros(n, 0)
    return TrainBatch(cond=None, advantages=torch.zeros(n), final_latents=x0, sigmas=flow_sigmas(6),
                      sde_steps=[], latents=empty, next_latents=empty, log_probs=empty, stds=empty,
                      means=None, seed=seed, group_ids=torch.tensor(groups) if with_groups else None,
                      epoch_seed=epoch_seed)


@pytest.mark.parametrize("algorithm", ["nft", "awm"])
def test_group_members_share_sigmas_and_noise(tmp_path, algorithm):
    cfg = tiny_config(tmp_path, algorithm, ["train.group_shared_noise=true", "train.num_train_timesteps=3"])
    algo = ALGORITHMS.get(algorithm)(cfg)
    x0 = torch.randn(6, 4, 2, 2)
    groups = [10, 11, 10, 12, 11, 10]
    s = algo.noised(batch(groups, x0))
    sig, eps = s["sigma"], s["eps"]
    assert sig.shape == (3, 6) and eps.shape == (3, 6, 4, 2, 2)
    for i in range(6):
        for j in range(6):
            same = groups[i] == groups[j]
            if same:  # (other groups may pick the same grid sigmas; their noise differs)
                assert torch.equal(sig[:, i], sig[:, j])
            assert torch.equal(eps[:, i], eps[:, j]) == same
    # x_t is each sample's own clean latent noised with the group's (sigma, eps)
    view = sig.view(3, 6, 1, 1, 1)
    torch.testing.assert_close(s["x_t"], (1 - view) * x0 + view * eps)

    # a group cut across micro-batches draws the same; another inner epoch draws anew
    part = algo.noised(batch([11, 10], x0[[4, 5]], seed=99))
    assert torch.equal(part["eps"][:, 0], eps[:, 1]) and torch.equal(part["eps"][:, 1], eps[:, 0])
    assert torch.equal(part["sigma"][:, 1], sig[:, 0])
    other = algo.noised(batch(groups, x0, epoch_seed=8))
    assert not torch.equal(other["eps"][:, 0], eps[:, 0])


def test_default_draws_per_sample_and_shared_noise_needs_group_ids(tmp_path):
    cfg = tiny_config(tmp_path, "nft", ["train.num_train_timesteps=2"])
    algo = ALGORITHMS.get("nft")(cfg)
    x0 = torch.randn(4, 4, 2, 2)
    s = algo.noised(batch([1, 1, 1, 1], x0))
    assert not torch.equal(s["eps"][:, 0], s["eps"][:, 1])  # same group, own noise
    assert torch.equal(algo.noised(batch([1, 1, 1, 1], x0))["eps"], s["eps"])  # seeded

    shared = ALGORITHMS.get("nft")(tiny_config(tmp_path, "nft", ["train.group_shared_noise=true"]))
    with pytest.raises(ValueError, match="group ids"):
        shared.noised(batch([1, 1, 1, 1], x0, with_groups=False))
