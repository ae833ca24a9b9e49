"""The ``flux1-kontext`` adapter against diffusers' own ``FluxKontextPipeline.__call__`` on a tiny
random pipeline.

The pinning test is the proof of the conventions: from the same initial noise and condition
images, the adapter's ODE rollout (flowrl's Euler step on ``adapter.sigmas``) reproduces the
pipeline's latents and images, which fails for a wrong condition size or preprocessing, a wrong
VAE normalization of the condition, condition tokens in the wrong place or with the wrong position
ids, a velocity not sliced back to the target tokens, or any ``flux1`` convention (timestep scale,
guidance embedding, packing, sigma grid). Both ``options.condition_size`` modes are pinned; for
``pipeline`` diffusers' ``PREFERRED_KONTEXT_RESOLUTIONS`` is swapped for small sizes (the adapter
reads the same table). The generic checks (LoRA, replay, loading) are in
``tests/contract/test_model_contract.py``.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.pipeline_tests import (assert_ode_rollout_matches, embedded_trainer_test, initial_noise,
                                         load_tiny, pipeline_fixtures)
from tests.helpers.tiny_edit_pipelines import condition_image
from tests.helpers.tiny_pipelines import PROMPTS, TINY_PIPELINES

SPEC = TINY_PIPELINES["flux1-kontext"]
H, W = SPEC.resolution

pipeline_dir, adapter, pipe = pipeline_fixtures(SPEC)
test_one_epoch_of_the_embedded_trainer = embedded_trainer_test(SPEC)


def run_pipeline(pipe, adapter, images, seeds, steps, guidance, **call):
    """The pipeline's ``__call__`` from the rollout's initial noise: (latents ``[B, C, h, w]``,
    images ``[B, 3, H, W]``)."""
    noise = initial_noise(adapter, seeds, (H, W))
    b, c, h, w = noise.shape
    kwargs = dict(image=images, prompt=PROMPTS[:len(seeds)], height=H, width=W, num_inference_steps=steps,
                  guidance_scale=guidance, max_sequence_length=SPEC.options["max_sequence_length"],
                  max_area=H * W, latents=pipe._pack_latents(noise.clone(), b, c, h, w), **call)
    packed = pipe(output_type="latent", **kwargs).images
    decoded = pipe(output_type="pt", **kwargs).images
    return pipe._unpack_latents(packed, H, W, pipe.vae_scale_factor), decoded


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_ode_rollout_matches_the_pipeline(adapter, pipe, guidance):
    """``condition_size: output``: the condition image resized to the rollout's (H, W), as the
    pipeline does for an image of that size with ``_auto_resize=False``."""
    seeds, steps = [0, 1], 3
    images = [condition_image(1), condition_image(2)]  # 40 x 56, not the rollout size
    resized = [pipe.image_processor.resize(im, H, W) for im in images]
    latents, decoded = run_pipeline(pipe, adapter, resized, seeds, steps, guidance, _auto_resize=False)
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=False, images=[[im] for im in images], resolution=(H, W))
    assert cond.tensors["image_latents"].shape == (2, *adapter.latent_shape((H, W)))
    assert_ode_rollout_matches(adapter, pipe, cond, seeds, (H, W), steps, guidance, latents, decoded)


def test_pipeline_condition_size_matches_the_pipelines_auto_resize(pipeline_dir, pipe, monkeypatch):
    """``condition_size: pipeline``: the preferred Kontext resolution closest to the image's aspect
    ratio (here 48 x 32 for a 56 x 40 image), as ``__call__`` with ``_auto_resize=True``."""
    from diffusers.pipelines.flux import pipeline_flux_kontext

    monkeypatch.setattr(pipeline_flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", [(32, 48), (32, 32), (48, 32)])
    auto = load_tiny(SPEC, pipeline_dir, options={"condition_size": "pipeline"})
    images = [condition_image(3), condition_image(4)]
    latents, decoded = run_pipeline(pipe, auto, images, [0, 1], 3, 3.5)
    cond = auto.encode_prompts(PROMPTS[:2], cfg=False, images=[[im] for im in images], resolution=(H, W))
    f = auto.vae_scale_factor
    assert cond.tensors["image_latents"].shape[-2:] == (32 // f, 48 // f)
    assert_ode_rollout_matches(auto, pipe, cond, [0, 1], (H, W), 3, 3.5, latents, decoded)


def test_each_distinct_condition_image_is_encoded_once(adapter, monkeypatch):
    """A group's members share their image objects: the VAE encodes each distinct image once and
    every member gets its latents."""
    calls = []
    encode = adapter.pipeline._encode_vae_image
    monkeypatch.setattr(adapter.pipeline, "_encode_vae_image",
                        lambda image, generator: calls.append(image.shape[0]) or encode(image, generator))
    a, b = condition_image(5), condition_image(6)
    cond = adapter.encode_prompts(PROMPTS[:4], cfg=False, images=[[a], [a], [b], [a]], resolution=(H, W))
    latents = cond.tensors["image_latents"]
    assert calls == [2]
    assert torch.equal(latents[0], latents[1]) and torch.equal(latents[0], latents[3])
    assert not torch.equal(latents[0], latents[2])


def test_condition_size_option_is_checked(pipeline_dir):
    with pytest.raises(ValueError, match="condition_size='square'.*'output'.*'pipeline'"):
        load_tiny(SPEC, pipeline_dir, options={"condition_size": "square"})
