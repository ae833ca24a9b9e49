"""``train.ref_guidance_scale``: the KL anchor is the frozen base's CFG-guided velocity while the
policy stays CFG-free (guidance distillation as the KL reference). The training conditioning then
carries the negatives the CFG-free rollout did not need."""

from __future__ import annotations

import pytest
import torch

from shared.config import ConfigError
from shared.models import load_adapter
from shared.rewards.builtin import Brightness
from tests.helpers.tiny import tiny_config
from trainer.algorithms import ALGORITHMS
from trainer.collect import plan_epoch, sample_locally
from trainer.data import load_prompts
from trainer.loop import train
from trainer.policy import Policy, attach_trainable

GEOMETRY = ["train.num_inference_steps=4", "train.group_size=4", "train.unique_sample_num_per_epoch=2",
            "train.per_device_batch_size=8", "train.gradient_step_per_epoch=1", "train.kl_beta=0.1"]


def _setup(tmp_path, extra):
    cfg = tiny_config(tmp_path, "nft", GEOMETRY + extra)
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    return cfg, adapter, policy


def test_the_reference_is_the_guided_base_and_the_policy_stays_cfg_free(tmp_path):
    cfg, adapter, policy = _setup(tmp_path, ["train.ref_guidance_scale=3.0"])
    t = cfg.train
    assert (t.guidance_scale, t.sampling_guidance_scale, t.reference_guidance_scale) == (1.0, 1.0, 3.0)
    assert t.encode_guidance_scale == 3.0
    rows, _ = load_prompts(cfg.data.dataset_dir, None)
    plan = plan_epoch(cfg, rows, 0, 0, 1)
    cond, roll, _ = sample_locally(cfg, adapter, policy, ALGORITHMS.get("nft")(cfg),
                                   {"brightness": Brightness()}, plan)
    assert cond.negative is not None  # encoded with the negatives the reference needs

    # the rollout itself is CFG-free: the same latents as without the option
    plain_cfg, _, _ = _setup(tmp_path, [])
    assert plain_cfg.train.encode_guidance_scale == 1.0
    plain_cond, plain_roll, _ = sample_locally(plain_cfg, adapter, policy, ALGORITHMS.get("nft")(plain_cfg),
                                               {"brightness": Brightness()}, plan)
    assert plain_cond.negative is None
    assert torch.equal(roll.final_latents, plain_roll.final_latents)
    for k in cond.tensors:  # and the positive conditioning is the same to the bit
        assert torch.equal(cond.tensors[k], plain_cond.tensors[k])

    # perturb the LoRA so the policy differs from the base, then compare with closed forms
    with torch.no_grad():
        for p in policy.trainable.values():
            p.add_(0.05 * torch.randn_like(p))
    x = roll.final_latents[:4].float()
    sigma = torch.full((4,), 0.7)
    c4 = cond.select(slice(0, 4))
    with torch.no_grad():
        v_ref = policy.ref_velocity(x, sigma, c4)
        adapter.transformer.disable_adapters()
        try:
            v_c, v_u = adapter.cfg_velocities(adapter.transformer, x, sigma, c4)
        finally:
            adapter.transformer.enable_adapters()
        v_policy = policy.velocity(x, sigma, c4)
    torch.testing.assert_close(v_ref, v_u + 3.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v_ref, v_c, atol=1e-4)  # guidance changes the anchor ...
    torch.testing.assert_close(v_policy, adapter.velocity(x, sigma, c4, 1.0, transformer=adapter.transformer))
    assert not torch.allclose(v_policy, v_ref, atol=1e-4)  # ... and the policy is not guided


def test_nft_trains_towards_the_guided_reference_with_the_encoders_dropped(tmp_path):
    """The warm-up encodes the train prompts with their negatives, and the CFG-free rollout takes
    exactly those entries: after it, no prompt is encoded again (a dropped encoder would raise)."""
    cfg = tiny_config(tmp_path, "nft", GEOMETRY + ["train.ref_guidance_scale=3.0", "train.max_epochs=1",
                                                  "eval.num_inference_steps=4", "model.offload_text_encoders=drop"])
    # held-out prompts that are not train prompts, so no CFG-free eval entry can serve a rollout
    (tmp_path / "data" / "test.txt").write_text("a held-out prompt\nanother held-out prompt\n")
    summary = train(cfg, quiet=True)
    assert summary["epochs"] == 1 and summary["optimizer_steps"] == 1


def test_a_guided_reference_without_a_kl_term_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="ref_guidance_scale: 4.5 sets .* but train.kl_beta is 0.0"):
        tiny_config(tmp_path, "nft", ["train.ref_guidance_scale=4.5", "train.kl_beta=0"])
    same = tiny_config(tmp_path, "nft", ["train.ref_guidance_scale=1.0", "train.kl_beta=0"])
    assert same.train.reference_guidance_scale == 1.0
