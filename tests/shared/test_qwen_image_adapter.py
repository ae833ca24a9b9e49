"""The ``qwen-image`` adapter against diffusers' own ``QwenImagePipeline.__call__`` on a tiny random
pipeline (tiny Qwen2.5-VL text encoder, byte-level BPE tokenizer built offline).

The pinning test is the proof of the conventions: from the same initial noise and on the same
sigma grid, the adapter's ODE rollout reproduces the pipeline's latents and images -- with and
without true CFG (``true_cfg_scale`` with a negative prompt, including Qwen-Image's per-token norm
rescaling), which fails for a wrong timestep scale, velocity sign, packing, mask/padding handling,
CFG combination or VAE normalization. The grid is the adapter's own (``adapter.sigmas``), equal
to the pipeline's, ``shift_terminal`` stretch included, at two resolutions. The generic checks
(LoRA, replay, loading) are in ``tests/contract/test_model_contract.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared.config import ModelConfig
from shared.flow import flow_sigmas
from shared.models import load_adapter
from tests.helpers.pipeline_tests import (assert_ode_rollout_matches, embedded_trainer_test, initial_noise,
                                         pipeline_fixtures, pipeline_grid)
from tests.helpers.tiny_pipelines import NEGATIVE, PROMPTS, QWEN_IMAGE_TEMPLATE, TINY_PIPELINES

SPEC = TINY_PIPELINES["qwen-image"]
H, W = SPEC.resolution

pipeline_dir, adapter, pipe = pipeline_fixtures(SPEC)
test_one_epoch_of_the_embedded_trainer = embedded_trainer_test(SPEC)


def test_the_tiny_tokenizer_drops_exactly_the_system_prompt(pipe):
    """Like the real Qwen tokenizer, the template's prefix is ``prompt_template_encode_start_idx``
    tokens, so the pipeline's encoder keeps exactly the user prompt and the closing tokens."""
    prefix = QWEN_IMAGE_TEMPLATE.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34


@pytest.mark.parametrize("w", [1.0, 4.0], ids=["no-cfg", "true-cfg"])
def test_ode_rollout_matches_the_pipeline(adapter, pipe, w):
    seeds, steps = [0, 1], 3
    noise = initial_noise(adapter, seeds, (H, W))
    b, c, h, wl = noise.shape
    kwargs = dict(prompt=PROMPTS[:2], height=H, width=W, num_inference_steps=steps, true_cfg_scale=w,
                  negative_prompt=[NEGATIVE] * 2 if w > 1 else None,
                  max_sequence_length=SPEC.options["max_sequence_length"],
                  latents=pipe._pack_latents(noise.clone(), b, c, h, wl))
    packed = pipe(output_type="latent", **kwargs).images
    images = pipe(output_type="pt", **kwargs).images
    expected = pipe._unpack_latents(packed, H, W, pipe.vae_scale_factor).squeeze(2)

    cond = adapter.encode_prompts(PROMPTS[:2], cfg=w > 1, negative_prompts=[NEGATIVE] * 2)
    # on the adapter's grid: the pipeline's, shift_terminal stretch included
    assert_ode_rollout_matches(adapter, pipe, cond, seeds, (H, W), steps, w, expected, images)


@pytest.mark.parametrize("resolution", [(32, 32), (64, 96)])
def test_rollout_grid_is_the_pipelines_grid(adapter, pipe, resolution):
    """Rollouts (``adapter.sigmas``) denoise on the grid of the pipeline's own ``__call__`` at their
    resolution: its ``mu`` and its ``shift_terminal`` stretch (the last nonzero sigma is 0.02)."""
    expected = pipeline_grid(pipe, SPEC, resolution, 10)
    assert expected[-2] == pytest.approx(0.02)
    torch.testing.assert_close(adapter.sigmas(10, resolution), expected, rtol=0, atol=0)


def test_scheduler_shift_is_the_pipelines_mu_shift_without_the_terminal_stretch(adapter, pipe):
    """``scheduler_shift`` = exp(mu) at ``shift_resolution`` (what ``model.scheduler_shift``
    replaces): ``flow_sigmas`` of it is the pipeline's mu-shifted grid before the pipeline stretches
    it to end at ``shift_terminal``. Rollouts without ``model.scheduler_shift`` have the stretch
    (``test_rollout_grid_is_the_pipelines_grid``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    config = pipe.scheduler.config
    tokens = (H // adapter.vae_scale_factor // 2) * (W // adapter.vae_scale_factor // 2)
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)
    assert adapter.scheduler_shift == pytest.approx(math.exp(mu), rel=1e-9)
    assert config.shift_terminal == 0.02
    unstretched = FlowMatchEulerDiscreteScheduler.from_config(config, shift_terminal=None)
    unstretched.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10), mu=mu)
    torch.testing.assert_close(flow_sigmas(10, adapter.scheduler_shift), unstretched.sigmas,
                               rtol=0, atol=1e-6)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10), mu=mu)
    assert pipe.scheduler.sigmas[-2] == pytest.approx(0.02)  # the stretch flow_sigmas does not do


def test_prompts_padded_to_max_sequence_length(adapter, pipe):
    cond = adapter.encode_prompts(PROMPTS[:3], cfg=True)
    length = SPEC.options["max_sequence_length"]
    assert cond.tensors["prompt_embeds"].shape == (3, length, 16)
    assert cond.negative["prompt_embeds"].shape == (3, length, 16)  # default negatives: empty prompts
    embeds, mask = pipe.encode_prompt(prompt=PROMPTS[:3], device="cpu", max_sequence_length=length)
    assert mask is not None  # the prompts have different lengths (the pipeline drops all-ones masks)
    n = embeds.shape[1]
    assert torch.equal(cond.tensors["prompt_mask"][:, :n], mask.bool())
    assert not cond.tensors["prompt_mask"][:, n:].any()
    torch.testing.assert_close(cond.tensors["prompt_embeds"][:, :n], embeds)


def test_max_sequence_length_limit(pipeline_dir):
    cfg = ModelConfig(model_type="qwen-image", model_name_or_path=str(pipeline_dir),
                      options={"max_sequence_length": 2048})
    with pytest.raises(ValueError, match="limit of 1024"):
        load_adapter(cfg, device=torch.device("cpu"), seed=0)
