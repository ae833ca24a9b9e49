"""The ``flux1`` adapter against diffusers' own ``FluxPipeline.__call__`` on a tiny random pipeline.

The pinning test is the proof of the conventions: from the same initial noise, the adapter's
deterministic rollout (flowrl's ODE step on the adapter's sigma grid, ``adapter.sigmas``)
reproduces the pipeline's latents and images, which fails for a wrong timestep scale (sigma vs
1000 sigma), a wrong velocity sign, a wrong 2x2 packing or image-id layout, a wrong guidance
embedding, a wrong VAE shift/scale or a wrong sigma shift. The grid itself equals the pipeline's
at two resolutions. The generic checks (LoRA, replay, loading) are in
``tests/contract/test_model_contract.py``.
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
from tests.helpers.tiny_pipelines import PROMPTS, TINY_PIPELINES

SPEC = TINY_PIPELINES["flux1"]
H, W = SPEC.resolution

pipeline_dir, adapter, pipe = pipeline_fixtures(SPEC)
test_one_epoch_of_the_embedded_trainer = embedded_trainer_test(SPEC)


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_ode_rollout_matches_the_pipeline(adapter, pipe, guidance):
    seeds, steps = [0, 1], 3
    noise = initial_noise(adapter, seeds, (H, W))  # [B, C, H/f, W/f], spatial
    b, c, h, w = noise.shape
    kwargs = dict(prompt=PROMPTS[:2], height=H, width=W, num_inference_steps=steps, guidance_scale=guidance,
                  max_sequence_length=SPEC.options["max_sequence_length"],
                  latents=pipe._pack_latents(noise.clone(), b, c, h, w))  # the pipeline takes packed latents
    packed = pipe(output_type="latent", **kwargs).images
    images = pipe(output_type="pt", **kwargs).images
    expected = pipe._unpack_latents(packed, H, W, pipe.vae_scale_factor)

    # the SD3-style shift exp(mu) at shift_resolution gives the pipeline's grid up to float rounding
    torch.testing.assert_close(flow_sigmas(steps, adapter.scheduler_shift), pipe.scheduler.sigmas,
                               rtol=0, atol=1e-6)
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=False)
    assert_ode_rollout_matches(adapter, pipe, cond, seeds, (H, W), steps, guidance, expected, images)


@pytest.mark.parametrize("resolution", [(32, 32), (64, 64), (32, 96), (1024, 1024)])
def test_shift_for_resolution_is_the_pipelines_mu_shift(adapter, pipe, resolution):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    h, w = resolution
    tokens = (h // adapter.vae_scale_factor // 2) * (w // adapter.vae_scale_factor // 2)
    config = pipe.scheduler.config
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)
    assert adapter.shift_for_resolution(resolution) == pytest.approx(math.exp(mu), rel=1e-9)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=mu)
    torch.testing.assert_close(flow_sigmas(5, adapter.shift_for_resolution(resolution)),
                               pipe.scheduler.sigmas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("resolution", [(32, 32), (64, 96)])
def test_rollout_grid_is_the_pipelines_grid(adapter, pipe, resolution):
    """Rollouts (``adapter.sigmas``) denoise on the grid of the pipeline's own ``__call__`` at
    their resolution (``mu`` differs between these two)."""
    expected = pipeline_grid(pipe, SPEC, resolution, 10)
    torch.testing.assert_close(adapter.sigmas(10, resolution), expected, rtol=0, atol=0)


def test_shift_options(pipeline_dir, adapter):
    default = load_adapter(ModelConfig(model_type="flux1", model_name_or_path=str(pipeline_dir)),
                           device=torch.device("cpu"), seed=0)
    assert default.options["shift_resolution"] == 512
    assert default.scheduler_shift == pytest.approx(adapter.shift_for_resolution(512))
    fixed = load_adapter(ModelConfig(model_type="flux1", model_name_or_path=str(pipeline_dir),
                                     options=SPEC.options, scheduler_shift=3.0),
                         device=torch.device("cpu"), seed=0)
    assert fixed.scheduler_shift == 3.0
    torch.testing.assert_close(fixed.sigmas(5, (H, W)), flow_sigmas(5, 3.0), rtol=0, atol=0)


def test_encodes_clip_pooled_and_t5_sequence(adapter, pipe):
    cond = adapter.encode_prompts(PROMPTS[:3], cfg=True, negative_prompts=["x"] * 3)
    assert cond.negative is None  # guidance-distilled: no negative branch
    assert cond.tensors["prompt_embeds"].shape == (3, SPEC.options["max_sequence_length"],
                                                   pipe.text_encoder_2.config.d_model)
    assert cond.tensors["pooled"].shape == (3, pipe.text_encoder.config.hidden_size)
