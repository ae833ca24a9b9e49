"""The rollout draws every SDE step's noise before its loop (one host-to-device copy, no copy
between steps); the chain is the one drawing it step by step gives, to the bit."""

from __future__ import annotations

import torch

from shared.config import ModelConfig
from shared.flow import sde_step
from shared.models import load_adapter
from shared.sampling import per_sample_noise, rollout, step_noise

CPU = torch.device("cpu")


def test_step_noise_is_each_generators_draws_in_order():
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    again = [torch.Generator().manual_seed(s) for s in (5, 6)]
    got = step_noise(gens, (3, 4), 3, CPU)
    assert got.shape == (3, 2, 3, 4)
    for k in range(3):
        assert torch.equal(got[k], per_sample_noise(again, (3, 4), CPU))
    assert step_noise(gens, (3, 4), 0, CPU).shape == (0, 2, 3, 4)


def test_rollout_equals_the_step_by_step_chain():
    adapter = load_adapter(ModelConfig(model_type="tiny"), device=CPU, seed=0)
    cond = adapter.encode_prompts(["a red cube", "two blue spheres"], cfg=True)
    sigmas = adapter.sigmas(6, (16, 16))
    roll = rollout(adapter, cond, [3, 4], resolution=(16, 16), sigmas=sigmas, guidance_scale=3.0,
                   dynamics="Flow-SDE", noise_level=0.7, sde_steps=[1, 2, 4], decode=False)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    shape = adapter.sample_shape((16, 16), None)
    x, log_probs = per_sample_noise(gens, shape, CPU), []
    with torch.no_grad():
        for i in range(6):
            s, s_next = sigmas[i].expand(2), sigmas[i + 1].expand(2)
            v = adapter.velocity(x.float(), s, cond, 3.0)
            if i in (1, 2, 4):
                out = sde_step(x, v, s, s_next, dynamics="Flow-SDE", noise_level=0.7,
                               noise=per_sample_noise(gens, shape, CPU))
                log_probs.append(out.log_prob)
            else:
                out = sde_step(x, v, s, s_next, dynamics="ODE", noise_level=0.0)
            x = out.prev_sample
    assert torch.equal(roll.final_latents, x.float())
    assert torch.equal(roll.log_probs, torch.stack(log_probs, 1).float())
