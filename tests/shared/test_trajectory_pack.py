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


@pytest.mark.parametrize("steps", [[0, 1, 2, 3], [1, 5], [2, 3, 6]])
def test_bfloat16_states_are_stored_exactly_and_unpack_to_float32(steps):
    roll = fake_rollout(steps, keep_means=False)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -3.5])
    roll.latents.view(-1)[-6:] = special  # not in the first state, which pack checks
    if steps == [0, 1, 2, 3]:
        roll.next_latents[:, :-1] = roll.latents[:, 1:]
    roll.latents, roll.next_latents = roll.latents.bfloat16().float(), roll.next_latents.bfloat16().float()
    packed = pack_trajectory(roll, "bfloat16")
    assert torch.equal(packed["states"].view(torch.int16),
                       pack_trajectory(roll)["states"].bfloat16().view(torch.int16))  # = torch's rounding
    assert packed["states"].dtype == torch.bfloat16 and packed["log_probs"].dtype == torch.float32
    back = unpack_trajectory(packed)
    assert back.latents.dtype == torch.float32
    assert torch.equal(back.latents, roll.latents) and torch.equal(back.next_latents, roll.next_latents)


def test_bfloat16_packing_refuses_states_that_are_not_bfloat16():
    roll = fake_rollout([0, 1], keep_means=False)  # float32 states, not rounded
    with pytest.raises(ValueError, match="not exact in bfloat16.*Fix: roll out with state_dtype"):
        pack_trajectory(roll, "bfloat16")
    with pytest.raises(ValueError, match="Fix: set train.rollout_state_dtype"):
        pack_trajectory(roll, "float16")
