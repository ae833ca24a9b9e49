"""Train/inference consistency: the log-prob the trainer recomputes for a stored transition
equals the one the rollout recorded (float32, same weights), for every stochastic dynamics,
with and without CFG, so the first PPO ratio is exactly 1 (flow_grpo / DanceGRPO README check)."""

from __future__ import annotations

import pytest
import torch

from shared.flow import flow_sigmas
from shared.models import load_adapter
from shared.sampling import rollout
from tests.helpers.tiny import tiny_config
from trainer.algorithms import ALGORITHMS, TrainBatch
from trainer.policy import Policy, attach_trainable


@pytest.mark.parametrize("dynamics", ["Flow-SDE", "Dance-SDE", "CPS"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recomputed_log_probs_match_rollout(tmp_path, dynamics, guidance, reduction):
    cfg = tiny_config(tmp_path, "grpo", [f"train.dynamics_type={dynamics}",
                                         f"train.guidance_scale={guidance}",
                                         f"train.log_prob_reduction={reduction}"])
    adapter = load_adapter(cfg.model, device="cpu", seed=0)
    trainable = attach_trainable(adapter, cfg)
    with torch.no_grad():  # give LoRA a non-zero effect so the check covers it
        for p in trainable.values():
            p.add_(0.05 * torch.randn_like(p))
    policy = Policy(adapter, adapter.transformer, cfg, trainable)
    prompts = ["a red circle", "a blue square", "a red circle", "a green square"]
    cond = adapter.encode_prompts(prompts, cfg=guidance > 1, negative_prompts=["blurry"] * 4)
    sigmas = flow_sigmas(cfg.train.num_inference_steps, adapter.scheduler_shift)
    sde_steps = list(range(cfg.train.num_inference_steps - 1))
    roll = rollout(adapter, cond, [11, 12, 13, 14], resolution=(16, 16), sigmas=sigmas,
                   guidance_scale=guidance, dynamics=dynamics, noise_level=cfg.train.noise_level,
                   sde_steps=sde_steps, log_prob_reduction=reduction)
    batch = TrainBatch(cond=cond, advantages=torch.zeros(4), final_latents=roll.final_latents,
                       sigmas=sigmas, sde_steps=roll.sde_steps, latents=roll.latents,
                       next_latents=roll.next_latents, log_probs=roll.log_probs, stds=roll.stds,
                       means=roll.means, seed=0)
    algo = ALGORITHMS.get("grpo")(cfg)
    for unit in range(len(sde_steps)):
        with torch.no_grad():
            out, *_ = algo.replay(batch, unit, policy)
        torch.testing.assert_close(out.log_prob, roll.log_probs[:, unit], rtol=0, atol=1e-5)
        ratio = torch.exp(out.log_prob - roll.log_probs[:, unit])
        assert torch.all((ratio - 1).abs() < 1e-5)


def test_rollout_is_per_sample_deterministic(tmp_path):
    """A sample's trajectory depends on its seed only, not on its batch mates."""
    cfg = tiny_config(tmp_path)
    adapter = load_adapter(cfg.model, device="cpu", seed=0)
    sigmas = flow_sigmas(6)
    kw = dict(resolution=(16, 16), sigmas=sigmas, guidance_scale=1.0, dynamics="Flow-SDE",
              noise_level=0.7, sde_steps=[0, 2, 4])
    a = rollout(adapter, adapter.encode_prompts(["a red circle"] * 3, cfg=False), [5, 6, 7], **kw)
    b = rollout(adapter, adapter.encode_prompts(["a red circle"], cfg=False), [6], **kw)
    torch.testing.assert_close(a.final_latents[1:2], b.final_latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.log_probs[1:2], b.log_probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dynamics", ["Flow-SDE", "CPS"])
def test_bfloat16_states_replay_exactly_through_the_blob_store(tmp_path, dynamics):
    """With state_dtype bfloat16 the chain continues from each rounded state and each log-prob
    is of the rounded next state: after the trip through a bfloat16 trajectory blob the trainer's
    replay reproduces the recorded log-probs as in float32, and the states are bf16-exact."""
    from shared.sampling import pack_trajectory, unpack_trajectory
    from shared.store import BlobStore

    cfg = tiny_config(tmp_path, "grpo", [f"train.dynamics_type={dynamics}", "train.guidance_scale=3.0",
                                         "train.rollout_state_dtype=bfloat16"])
    adapter = load_adapter(cfg.model, device="cpu", seed=0)
    trainable = attach_trainable(adapter, cfg)
    policy = Policy(adapter, adapter.transformer, cfg, trainable)
    prompts = ["a red circle", "a blue square"]
    cond = adapter.encode_prompts(prompts, cfg=True, negative_prompts=["blurry"] * 2)
    sigmas = flow_sigmas(cfg.train.num_inference_steps, adapter.scheduler_shift)
    sde_steps = list(range(cfg.train.num_inference_steps - 1))
    kw = dict(resolution=(16, 16), sigmas=sigmas, guidance_scale=3.0, dynamics=dynamics,
              noise_level=cfg.train.noise_level, sde_steps=sde_steps)
    roll = rollout(adapter, cond, [3, 4], state_dtype=cfg.train.rollout_state_dtype, **kw)
    assert roll.latents.dtype == torch.float32
    assert torch.equal(roll.latents.bfloat16().float(), roll.latents)
    assert torch.equal(roll.next_latents[:, :-1], roll.latents[:, 1:])  # one chain, from rounded states
    full = rollout(adapter, cond, [3, 4], **kw)  # the float32 chain differs, but only by rounding
    assert not torch.equal(full.latents, roll.latents)
    torch.testing.assert_close(full.final_latents, roll.final_latents, atol=0.1, rtol=0)
    store = BlobStore(f"file://{tmp_path}/blobs")
    ref = store.put_tensors("t.safetensors", pack_trajectory(roll, "bfloat16"), digest="xxh3_128")
    back = unpack_trajectory(store.get_tensors(ref))
    assert ref.nbytes < pack_trajectory(roll)["states"].numel() * 4  # the states are 2 bytes each
    batch = TrainBatch(cond=cond, advantages=torch.zeros(2), final_latents=back.final_latents,
                       sigmas=back.sigmas, sde_steps=back.sde_steps, latents=back.latents,
                       next_latents=back.next_latents, log_probs=back.log_probs, stds=back.stds,
                       means=back.means, seed=0)
    algo = ALGORITHMS.get("grpo")(cfg)
    for unit in range(len(sde_steps)):
        with torch.no_grad():
            out, *_ = algo.replay(batch, unit, policy)
        torch.testing.assert_close(out.log_prob, roll.log_probs[:, unit], rtol=0, atol=1e-5)
