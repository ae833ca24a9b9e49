"""The ``flux1`` adapter against diffusers' own ``FluxPipeline.__call__`` on a tiny random pipeline.

The pinning test is the proof of the conventions: from the same initial noise, the adapter's
deterministic rollout (flowrl's ODE step on flowrl's sigma grid) reproduces the pipeline's
latents and images, which fails for a wrong timestep scale (sigma vs 1000 sigma), a wrong
velocity sign, a wrong 2x2 packing or image-id layout, a wrong guidance embedding, a wrong
VAE shift/scale or a wrong sigma shift. The generic checks (LoRA, replay, loading) are in
``tests/contract/test_model_contract.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import ModelConfig
from shared.flow import flow_sigmas
from shared.models import load_adapter
from shared.sampling import per_sample_noise, rollout
from tests.helpers.tiny_pipelines import PROMPTS, TINY_PIPELINES, tiny_train_config

SPEC = TINY_PIPELINES["flux1"]
H, W = SPEC.resolution


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return SPEC.save(tmp_path_factory.mktemp("flux1") / "pipe")


@pytest.fixture(scope="module")
def adapter(pipeline_dir):
    cfg = ModelConfig(model_type="flux1", model_name_or_path=str(pipeline_dir), options=SPEC.options)
    return load_adapter(cfg, device=torch.device("cpu"), seed=0)


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    return SPEC.load_pipeline(pipeline_dir)


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_ode_rollout_matches_the_pipeline(adapter, pipe, guidance):
    seeds, steps = [0, 1], 3
    shape = adapter.latent_shape((H, W))  # [C, H/f, W/f], spatial
    noise = per_sample_noise([torch.Generator().manual_seed(s) for s in seeds], shape, torch.device("cpu"))
    b, c, h, w = noise.shape
    kwargs = dict(prompt=PROMPTS[:2], height=H, width=W, num_inference_steps=steps, guidance_scale=guidance,
                  max_sequence_length=SPEC.options["max_sequence_length"],
                  latents=pipe._pack_latents(noise.clone(), b, c, h, w))  # the pipeline takes packed latents
    packed = pipe(output_type="latent", **kwargs).images
    images = pipe(output_type="pt", **kwargs).images
    expected = pipe._unpack_latents(packed, H, W, pipe.vae_scale_factor)

    # flowrl's own grid (SD3-style shift = exp(mu) at shift_resolution) is the pipeline's grid
    sigmas = flow_sigmas(steps, adapter.scheduler_shift)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas, rtol=0, atol=1e-6)
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=False)
    roll = rollout(adapter, cond, seeds, resolution=(H, W), sigmas=sigmas, guidance_scale=guidance,
                   dynamics="ODE", noise_level=0.0, sde_steps=[])
    torch.testing.assert_close(roll.final_latents, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(roll.images, images, rtol=0, atol=1e-4)


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


def test_shift_options(pipeline_dir, adapter):
    default = load_adapter(ModelConfig(model_type="flux1", model_name_or_path=str(pipeline_dir)),
                           device=torch.device("cpu"), seed=0)
    assert default.options["shift_resolution"] == 512
    assert default.scheduler_shift == pytest.approx(adapter.shift_for_resolution(512))
    fixed = load_adapter(ModelConfig(model_type="flux1", model_name_or_path=str(pipeline_dir),
                                     options=SPEC.options, scheduler_shift=3.0),
                         device=torch.device("cpu"), seed=0)
    assert fixed.scheduler_shift == 3.0


def test_encodes_clip_pooled_and_t5_sequence(adapter, pipe):
    cond = adapter.encode_prompts(PROMPTS[:3], cfg=True, negative_prompts=["x"] * 3)
    assert cond.negative is None  # guidance-distilled: no negative branch
    assert cond.tensors["prompt_embeds"].shape == (3, SPEC.options["max_sequence_length"],
                                                   pipe.text_encoder_2.config.d_model)
    assert cond.tensors["pooled"].shape == (3, pipe.text_encoder.config.hidden_size)


@pytest.mark.parametrize("trainer_type", ["grpo", "nft"])
def test_one_epoch_of_the_embedded_trainer(pipeline_dir, tmp_path, trainer_type):
    """The adapter inside the real loop: rollouts, replay with gradients, the EMA view (nft samples
    from it) and the LoRA-disabled reference (kl_beta), checkpoint."""
    from trainer.loop import train

    cfg = tiny_train_config(SPEC, pipeline_dir, tmp_path, train={"trainer_type": trainer_type, "kl_beta": 0.01})
    summary = train(cfg, quiet=True)
    assert summary["optimizer_steps"] == 1 and summary["samples"] == 4
    assert (Path(summary["checkpoint"]) / "lora" / "pytorch_lora_weights.safetensors").is_file()
