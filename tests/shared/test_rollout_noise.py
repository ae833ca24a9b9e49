"""The rollout draws every SDE step's noise before its loop (one host-to-device copy, no copy
between steps); the chain is the one drawing it step by step gives, to the bit."""

from __future__ import annotations

import pytest
import torch

from shared.config import ModelConfig
from shared.flow import sde_step
from shared.models import load_adapter
from shared.sampling import per_sample_noise, rollout, step_noise
from tests.helpers.host_reads import HostReads

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


def test_the_denoising_loop_reads_nothing_back_to_the_host(monkeypatch):
    # a GPU rollout must not wait for the device between steps (issue 8): the sigma checks run once
    # on the host grid before the loop, sde_step is told not to repeat them
    adapter = load_adapter(ModelConfig(model_type="tiny"), device=CPU, seed=0)
    cond = adapter.encode_prompts(["a red cube", "two blue spheres"], cfg=True)
    reads = HostReads(monkeypatch)
    velocity, decode = adapter.velocity, adapter.decode

    def first_step_arms(*args, **kwargs):
        reads.armed = True
        return velocity(*args, **kwargs)

    def decode_disarms(*args, **kwargs):
        reads.armed = False
        return decode(*args, **kwargs)

    monkeypatch.setattr(adapter, "velocity", first_step_arms)
    monkeypatch.setattr(adapter, "decode", decode_disarms)
    for dynamics in ("Flow-SDE", "Dance-SDE", "CPS", "ODE"):
        rollout(adapter, cond, [3, 4], resolution=(16, 16), sigmas=adapter.sigmas(6, (16, 16)), guidance_scale=3.0,
                dynamics=dynamics, noise_level=0.7, sde_steps=[0, 1, 2, 4])
        assert reads.where == [], f"{dynamics}: the loop read tensors back to the host: {reads.where}"


def test_a_bad_grid_fails_before_the_first_step():
    adapter = load_adapter(ModelConfig(model_type="tiny"), device=CPU, seed=0)
    cond = adapter.encode_prompts(["a"], cfg=False)
    calls = []
    adapter.velocity = lambda *a, **k: calls.append(1)  # never reached
    for sigmas, match in ((torch.tensor([1.0, 0.5, 0.6, 0.0]), "sigma_next must be <= sigma"),
                          (torch.tensor([1.0, 0.5, 0.0, 0.0]), "sigma must be > 0 for Flow-SDE"),
                          (torch.tensor([1.0, 1.0, 0.5, 0.0]), "zero-length step at sigma = 1")):
        with pytest.raises(ValueError, match=match):
            rollout(adapter, cond, [0], resolution=(16, 16), sigmas=sigmas, guidance_scale=1.0, dynamics="Flow-SDE",
                    noise_level=0.7, sde_steps=[0, 1, 2])
    assert calls == []


def test_noise_device_is_checked_and_reaches_the_sampling_params(tmp_path):
    from types import SimpleNamespace

    from tests.helpers.tiny import tiny_config
    from trainer.collect import sampling_params

    adapter = load_adapter(ModelConfig(model_type="tiny"), device=CPU, seed=0)
    cond = adapter.encode_prompts(["a"], cfg=False)
    with pytest.raises(ValueError, match="noise_device must be 'cpu' or 'model', got 'gpu'"):
        rollout(adapter, cond, [0], resolution=(16, 16), sigmas=adapter.sigmas(3, (16, 16)), guidance_scale=1.0,
                dynamics="Flow-SDE", noise_level=0.7, sde_steps=[0], noise_device="gpu")
    # on a CPU model both draw on the CPU: the same chain
    a, b = (rollout(adapter, cond, [7], resolution=(16, 16), sigmas=adapter.sigmas(3, (16, 16)), guidance_scale=1.0,
                    dynamics="Flow-SDE", noise_level=0.7, sde_steps=[0, 1], noise_device=d, decode=False)
            for d in ("cpu", "model"))
    assert torch.equal(a.final_latents, b.final_latents)

    cfg = tiny_config(tmp_path, "grpo", ["train.rollout_noise_device=model"])
    plan = SimpleNamespace(sde_steps=[0, 1])
    assert sampling_params(cfg, plan, keep_means=False).noise_device == "model"
    assert sampling_params(tiny_config(tmp_path, "grpo"), plan, keep_means=False).noise_device == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_noise_drawn_on_the_gpu_is_per_sample_and_reproducible():
    adapter = load_adapter(ModelConfig(model_type="tiny"), device=torch.device("cuda"), seed=0)
    cond = adapter.encode_prompts(["a red cube", "two blue spheres"], cfg=False)

    def run(c, seeds):
        return rollout(adapter, c, seeds, resolution=(16, 16), sigmas=adapter.sigmas(4, (16, 16)), guidance_scale=1.0,
                       dynamics="Flow-SDE", noise_level=0.7, sde_steps=[0, 1, 2], noise_device="model", decode=False)

    pair, again, alone = run(cond, [3, 4]), run(cond, [3, 4]), run(cond.select(slice(1, 2)), [4])
    assert torch.equal(pair.final_latents, again.final_latents)
    torch.testing.assert_close(pair.final_latents[1:], alone.final_latents, rtol=1e-4, atol=1e-4)
    assert pair.final_latents.device.type == "cuda"


def test_rollout_batch_size_sets_the_rollout_micro_batch_only(tmp_path):
    from types import SimpleNamespace

    from tests.helpers.tiny import tiny_config
    from trainer.collect import sampling_params
    from trainer.loop import train

    plan = SimpleNamespace(sde_steps=[0, 1])
    base = tiny_config(tmp_path, "grpo", ["train.per_device_batch_size=2"])
    assert sampling_params(base, plan, keep_means=False).batch_size == 2
    big = tiny_config(tmp_path, "grpo", ["train.per_device_batch_size=2", "train.rollout_batch_size=4",
                                         "train.max_epochs=1"])
    assert sampling_params(big, plan, keep_means=False).batch_size == 4
    assert train(big, quiet=True)["samples"] > 0

    # per-sample generators: a sample's chain does not depend on its rollout batch
    adapter = load_adapter(ModelConfig(model_type="tiny"), device=CPU, seed=0)
    from shared.sampling import rollout_batches

    def chains(batch_size):
        _, roll = rollout_batches(adapter, ["a", "b", "c", "d"], [None] * 4, [1, 2, 3, 4], batch_size=batch_size,
                                  resolution=16, num_steps=4, guidance_scale=1.0, dynamics="Flow-SDE",
                                  noise_level=0.7, sde_steps=[0, 1], keep_means=False, log_prob_reduction="mean",
                                  transformer=None)
        return roll.final_latents

    torch.testing.assert_close(chains(4), chains(2), rtol=1e-5, atol=1e-5)
