"""pack_trajectory / unpack_trajectory: exact inverse, each latent state stored once."""

from __future__ import annotations

import pytest
import torch

from shared.sampling import Rollout, pack_trajectory, unpack_trajectory


def fake_rollout(steps: list[int], keep_means: bool) -> Rollout:
    """A rollout whose states follow one chain x_0 .. x_N, as a real one does."""
    b, n = 3, 8
    chain = torch.randn(b, n + 1, 4, 2, 2)
    s = len(steps)
    return Rollout(final_latents=chain[:, n], images=None, sigmas=torch.linspace(1, 0, n + 1),
                   sde_steps=steps, latents=chain[:, steps], next_latents=chain[:, [i + 1 for i in steps]],
                   log_probs=torch.randn(b, s), stds=torch.rand(b, s),
                   means=torch.randn(b, s, 4, 2, 2) if keep_means else None)


@pytest.mark.parametrize("steps,stored", [([0, 1, 2, 3], 5), ([1, 5], 4), ([2, 3, 6], 5), ([], 0)])
@pytest.mark.parametrize("keep_means", [False, True])
def test_round_trip_and_storage(steps, stored, keep_means):
    roll = fake_rollout(steps, keep_means)
    packed = pack_trajectory(roll)
    assert packed["states"].shape[1] == stored  # consecutive steps share their states
    back = unpack_trajectory(packed)
    assert back.sde_steps == steps and back.images is None
    for key in ("final_latents", "latents", "next_latents", "log_probs", "stds", "sigmas", "means"):
        a, b = getattr(back, key), getattr(roll, key)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b), key
