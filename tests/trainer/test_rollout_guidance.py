"""``train.rollout_guidance_scale``: NFT / AWM sample their rollouts with CFG while the policy
they train stays CFG-free (the behaviour policy is the guided model); GRPO, which replays the
rollout's own log-probabilities, refuses it."""

from __future__ import annotations

import pytest
import torch

from shared.config import ConfigError
from shared.models import load_adapter
from tests.helpers.tiny import tiny_config
from trainer.algorithms import ALGORITHMS
from trainer.collect import plan_epoch, sample_locally, sampling_params
from trainer.data import load_prompts
from trainer.loop import train
from shared.rewards.builtin import Brightness
from trainer.policy import Policy, attach_trainable

GEOMETRY = ["train.num_inference_steps=4", "train.group_size=4", "train.unique_sample_num_per_epoch=2",
            "train.per_device_batch_size=8", "train.gradient_step_per_epoch=1"]


def test_rollouts_use_the_rollout_scale_and_the_policy_keeps_its_own(tmp_path):
    cfg = tiny_config(tmp_path, "nft", GEOMETRY + ["train.rollout_guidance_scale=3.0"])
    assert cfg.train.guidance_scale == 1.0 and cfg.train.sampling_guidance_scale == 3.0
    rows, _ = load_prompts(cfg.data.dataset_dir, None)
    plan = plan_epoch(cfg, rows, 0, 0, 1)
    assert sampling_params(cfg, plan, keep_means=False).guidance_scale == 3.0
    plain = tiny_config(tmp_path, "nft", GEOMETRY)
    assert plain.train.sampling_guidance_scale == 1.0
    assert sampling_params(plain, plan, keep_means=False).guidance_scale == 1.0

    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    assert policy.guidance_scale == 1.0  # what NFT trains and evaluation samples with
    algo, rewards = ALGORITHMS.get("nft")(cfg), {"brightness": Brightness()}
    _, guided, _ = sample_locally(cfg, adapter, policy, algo, rewards, plan)
    _, unguided, _ = sample_locally(plain, adapter, policy, algo, rewards, plan)
    # the same rollout a CFG-3 policy would draw: the same seeds, the guided velocity
    as_policy = tiny_config(tmp_path, "nft", GEOMETRY + ["train.guidance_scale=3.0"])
    _, reference, _ = sample_locally(as_policy, adapter, policy, algo, rewards, plan)
    assert torch.equal(guided.final_latents, reference.final_latents)
    assert not torch.allclose(guided.final_latents, unguided.final_latents)


def test_nft_trains_a_cfg_free_policy_on_guided_rollouts(tmp_path):
    cfg = tiny_config(tmp_path, "nft", GEOMETRY + ["train.rollout_guidance_scale=3.0", "train.max_epochs=1",
                                                  "eval.num_inference_steps=4"])
    summary = train(cfg, quiet=True)
    assert summary["epochs"] == 1 and summary["optimizer_steps"] == 1


def test_grpo_refuses_a_rollout_scale_other_than_its_policys(tmp_path):
    with pytest.raises(ConfigError, match="rollout_guidance_scale: 3.0 differs"):
        tiny_config(tmp_path, "grpo", ["train.rollout_guidance_scale=3.0"])
    same = tiny_config(tmp_path, "grpo", ["train.rollout_guidance_scale=4.5", "train.guidance_scale=4.5"])
    assert same.train.sampling_guidance_scale == 4.5
