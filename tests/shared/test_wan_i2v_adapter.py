"""The ``wan2_i2v`` adapter against diffusers' own ``WanImageToVideoPipeline.__call__`` on tiny random
pipelines (:mod:`tests.helpers.tiny_video_pipelines`), both kinds of first-frame conditioning:
Wan2.1-I2V (condition latents and mask on the channel axis, CLIP image embeddings) and Wan2.2-TI2V
(``expand_timesteps``: the first latent frame replaced by the image's latents, timestep 0 there).

Pinning: from the same noise, on the same grid (an Euler scheduler, so ``__call__`` takes the steps
flowrl takes), the adapter's ODE rollout reproduces the pipeline's video latents and frames, with
and without CFG. The pipeline gets the prompt embeddings precomputed: its own prompt cleaning calls
``ftfy`` unconditionally (a NameError without ftfy installed); the adapter encodes prompts with
``WanPipeline``'s identical function, pinned in ``tests/shared/test_wan_adapter.py``.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch

from tests.helpers.pipeline_tests import (assert_ode_rollout_matches, embedded_trainer_test, initial_noise, load_tiny,
                                         pipeline_fixtures)
from tests.helpers.tiny_edit_pipelines import condition_image
from tests.helpers.tiny_pipelines import NEGATIVE, PROMPTS, TINY_PIPELINES
from tests.helpers.tiny_video_pipelines import build_wan_i2v

SPEC = TINY_PIPELINES["wan2_i2v"]
H, W = SPEC.resolution
FRAMES = SPEC.options["num_frames"]
VARIANTS = {"wan2.1-i2v": False, "wan2.2-ti2v": True}

pipeline_dir, _, _ = pipeline_fixtures(SPEC)  # the contract suite's pipeline (UniPC, Wan2.1-I2V)
test_one_epoch_of_the_embedded_trainer = embedded_trainer_test(SPEC)  # jsonl rows with an image each


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def euler(request, tmp_path_factory):
    """(adapter, pipeline, ti2v) of the variant, both loaded from one saved Euler pipeline."""
    ti2v = VARIANTS[request.param]
    spec = dataclasses.replace(SPEC, build=lambda seed=0: build_wan_i2v(seed, euler=True, ti2v=ti2v))
    folder = spec.save(tmp_path_factory.mktemp(request.param.replace(".", "")) / "pipe")
    return load_tiny(spec, folder), spec.load_pipeline(folder), ti2v


def embeddings(pipe, texts):
    from diffusers import WanPipeline

    return WanPipeline._get_t5_prompt_embeds(pipe, texts, max_sequence_length=SPEC.options["max_sequence_length"])


@pytest.mark.parametrize("w", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_ode_rollout_matches_the_pipeline(euler, w):
    adapter, pipe, ti2v = euler
    image = condition_image(3)
    seeds, steps = [0, 1], 3
    noise = initial_noise(adapter, seeds, (H, W))
    kwargs = dict(image=image, prompt_embeds=embeddings(pipe, PROMPTS[:2]), height=H, width=W,
                  negative_prompt_embeds=embeddings(pipe, [NEGATIVE] * 2) if w > 1 else None,
                  num_frames=FRAMES, num_inference_steps=steps, guidance_scale=w)
    latents = pipe(output_type="latent", latents=noise.clone(), **kwargs).frames
    frames = pipe(output_type="pt", latents=noise.clone(), **kwargs).frames
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=w > 1, negative_prompts=[NEGATIVE] * 2,
                                  images=[[image], [image]], resolution=(H, W))
    assert ("image_latents" in cond.tensors) is ti2v and ("image_embeds" in cond.tensors) is not ti2v
    assert_ode_rollout_matches(adapter, pipe, cond, seeds, (H, W), steps, w, latents, frames)


def test_conditioning_follows_num_frames_and_is_encoded_once_per_image(euler):
    adapter, _, ti2v = euler
    a, b = condition_image(1), condition_image(2)
    vae = adapter.pipeline.vae
    with mock.patch.object(vae, "encode", wraps=vae.encode) as encode:
        cond = adapter.encode_prompts(PROMPTS[:3], cfg=False, images=[[a], [a], [b]], resolution=(H, W),
                                      num_frames=9)
    assert encode.call_count == 2  # two distinct images
    key = "image_latents" if ti2v else "condition"
    c = cond.tensors[key]
    assert c.shape[2] == (1 if ti2v else 3)  # Wan2.1's condition spans the 9 frames' 3 latent frames
    assert torch.equal(c[0], c[1]) and not torch.equal(c[0], c[2])
    with pytest.raises(ValueError, match="num_frames=6 .*Fix"):
        adapter.encode_prompts(PROMPTS[:1], cfg=False, images=[[a]], resolution=(H, W), num_frames=6)


def test_ti2v_first_frame_is_the_image(euler):
    """Wan2.2-TI2V: the rollout's first latent frame ends exactly on the image's latents, also
    after stochastic (Flow-SDE) steps."""
    from shared.sampling import rollout

    adapter, _, ti2v = euler
    if not ti2v:
        pytest.skip("Wan2.1-I2V generates its first frame")
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=False, images=[[condition_image(5)]] * 2, resolution=(H, W))
    roll = rollout(adapter, cond, [0, 1], resolution=(H, W), sigmas=adapter.sigmas(3, (H, W)), guidance_scale=1.0,
                   dynamics="Flow-SDE", noise_level=0.7, sde_steps=[0, 1])
    torch.testing.assert_close(roll.final_latents[:, :, :1], cond.tensors["image_latents"], rtol=0, atol=1e-5)


def test_wan22_i2v_a14b_two_experts_roll_out():
    """Wan2.2-I2V-A14B's layout (two experts, ``boundary_ratio`` 0.9, first-frame conditioning on
    the channel axis, no image encoder): the rollout runs, each expert takes its steps."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    from shared.models.experts import TwoExperts
    from shared.models.wan_i2v import WanI2VAdapter
    from shared.sampling import rollout_batches
    from tests.helpers.tiny_edit_pipelines import condition_rows
    from tests.helpers.tiny_pipelines import build_wan_t2v

    t2v = build_wan_t2v(0)
    z = t2v.vae.config.z_dim

    def expert(seed: int):
        torch.manual_seed(seed)
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                     in_channels=2 * z + t2v.vae.config.scale_factor_temporal, out_channels=z,
                                     text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)

    pipe = WanImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                   scheduler=t2v.scheduler, image_processor=None, image_encoder=None,
                                   transformer=expert(1), transformer_2=expert(2), boundary_ratio=0.9)
    adapter = WanI2VAdapter.from_pipeline(pipe, {**SPEC.options, "guidance_scale_2": 2.0})
    assert isinstance(adapter.transformer, TwoExperts)
    calls = {"transformer": 0, "transformer_2": 0}
    for name, module in adapter.transformer.parts():
        module.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))
    _, roll = rollout_batches(adapter, PROMPTS[:2], [None, None], [0, 1], batch_size=2, resolution=(H, W),
                              num_steps=4, guidance_scale=3.0, dynamics="Flow-SDE", noise_level=0.7, sde_steps=[0, 2],
                              keep_means=False, log_prob_reduction="mean", transformer=adapter.transformer,
                              images=condition_rows(2, 1))
    assert roll.images.shape == (2, SPEC.options["num_frames"], 3, H, W)
    assert torch.isfinite(roll.log_probs).all()
    high = int((adapter.sigmas(4, (H, W))[:-1] >= 0.9).sum())
    # two calls a step (CFG: conditional, then unconditional, as WanPipeline)
    assert calls == {"transformer": 2 * high, "transformer_2": 2 * (4 - high)} and 0 < high < 4
