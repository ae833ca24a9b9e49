"""The ``qwen-image-edit-plus`` adapter against diffusers' own ``QwenImageEditPlusPipeline.__call__``
on a tiny random pipeline (tiny Qwen2.5-VL with a vision tower, BPE tokenizer built offline,
``zero_cond_t`` transformer as Qwen-Image-Edit-2511).

The pinning test is the proof of the conventions: from the same initial noise and the same two
condition images, the adapter's ODE rollout reproduces the pipeline's latents and images -- with
and without true CFG -- which fails for wrong VL inputs (template, image placeholders, condition
resize), a wrong VAE normalization or size of the condition latents, condition tokens out of
order or with wrong ``img_shapes``, a velocity not sliced to the target tokens, or any
``qwen-image`` convention. The pipeline sizes its VAE condition images to about
``VAE_IMAGE_SIZE`` pixels (1024 x 1024); the tests swap that constant for small sizes (the
adapter's ``condition_size: pipeline`` reads the same constant): at ``H x W`` square images give
exactly what ``condition_size: output`` does. The pipeline takes batches of one.
"""

from __future__ import annotations

import pytest
import torch

from shared.models.qwen_vl_processor import has_torchvision
from tests.helpers.pipeline_tests import (assert_ode_rollout_matches, embedded_trainer_test, initial_noise,
                                         load_tiny, pipeline_fixtures)
from tests.helpers.tiny_edit_pipelines import QWEN_EDIT_TEMPLATE, condition_image
from tests.helpers.tiny_pipelines import NEGATIVE, PROMPTS, TINY_PIPELINES

SPEC = TINY_PIPELINES["qwen-image-edit-plus"]
H, W = SPEC.resolution

pipeline_dir, adapter, pipe = pipeline_fixtures(SPEC)
test_one_epoch_of_the_embedded_trainer = embedded_trainer_test(SPEC)


def edit_module():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    return pipeline_qwenimage_edit_plus


def run_pipeline(pipe, adapter, images, w, steps=3):
    """``__call__`` for ``PROMPTS[0]`` from seed 0's initial noise: (latents ``[1, C, h, w]``,
    images ``[1, 3, H, W]``)."""
    noise = initial_noise(adapter, [0], (H, W))
    b, c, h, wl = noise.shape
    kwargs = dict(image=images, prompt=PROMPTS[0], height=H, width=W, num_inference_steps=steps,
                  true_cfg_scale=w, negative_prompt=NEGATIVE if w > 1 else None,
                  latents=pipe._pack_latents(noise.clone(), b, c, h, wl))
    packed = pipe(output_type="latent", **kwargs).images
    decoded = pipe(output_type="pt", **kwargs).images
    return pipe._unpack_latents(packed, H, W, pipe.vae_scale_factor).squeeze(2), decoded


def test_the_tiny_tokenizer_drops_exactly_the_system_prompt(pipe):
    prefix = QWEN_EDIT_TEMPLATE.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 64


@pytest.mark.parametrize("w", [1.0, 3.0], ids=["no-cfg", "true-cfg"])
def test_ode_rollout_matches_the_pipeline(adapter, pipe, monkeypatch, w):
    """``condition_size: output`` (the default): square condition images, VAE_IMAGE_SIZE = H x W."""
    monkeypatch.setattr(edit_module(), "VAE_IMAGE_SIZE", H * W)
    images = [condition_image(1, (40, 40)), condition_image(2, (48, 48))]
    latents, decoded = run_pipeline(pipe, adapter, images, w)
    cond = adapter.encode_prompts(PROMPTS[:1], cfg=w > 1, negative_prompts=[NEGATIVE], images=[images],
                                  resolution=(H, W))
    assert [cond.tensors[f"image_latents.{i}"].shape for i in range(2)] == [(1, *adapter.latent_shape((H, W)))] * 2
    assert_ode_rollout_matches(adapter, pipe, cond, [0], (H, W), 3, w, latents, decoded)


def test_pipeline_condition_size_matches_the_pipeline(pipeline_dir, pipe, monkeypatch):
    """``condition_size: pipeline``: each VAE condition image at about VAE_IMAGE_SIZE pixels at its own
    aspect ratio (here 64 x 32 and 32 x 64 (w x h) for 56 x 40 and 40 x 56 images)."""
    monkeypatch.setattr(edit_module(), "VAE_IMAGE_SIZE", 48 * 48)
    auto = load_tiny(SPEC, pipeline_dir, options={"condition_size": "pipeline"})
    images = [condition_image(3), condition_image(4, (56, 40))]
    latents, decoded = run_pipeline(pipe, auto, images, 3.0)
    cond = auto.encode_prompts(PROMPTS[:1], cfg=True, negative_prompts=[NEGATIVE], images=[images],
                               resolution=(H, W))
    f = auto.vae_scale_factor
    assert cond.tensors["image_latents.0"].shape[-2:] == (32 // f, 64 // f)
    assert cond.tensors["image_latents.1"].shape[-2:] == (64 // f, 32 // f)
    assert_ode_rollout_matches(auto, pipe, cond, [0], (H, W), 3, 3.0, latents, decoded)


def test_a_batch_equals_its_samples_one_by_one(adapter):
    """The pipeline runs one sample at a time; flowrl batches (prompts padded, masked): each row of
    a batch's velocity equals that sample's own, and the negatives see the same images."""
    rows = [[condition_image(5), condition_image(6)], [condition_image(7), condition_image(8)]]
    prompts = [PROMPTS[0], PROMPTS[3]]  # different lengths: padding and the mask act
    kw = dict(cfg=True, negative_prompts=[NEGATIVE] * 2, resolution=(H, W))
    both = adapter.encode_prompts(prompts, images=rows, **kw)
    assert both.tensors["prompt_mask"].sum(1).tolist()[0] != both.tensors["prompt_mask"].sum(1).tolist()[1]
    x = initial_noise(adapter, [3, 4], (H, W))
    sigma = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        v = adapter.velocity(x, sigma, both, 3.0)
        for i in range(2):
            one = adapter.encode_prompts(prompts[i:i + 1], images=rows[i:i + 1], **kw)
            torch.testing.assert_close(v[i:i + 1], adapter.velocity(x[i:i + 1], sigma[:1], one, 3.0),
                                       rtol=0, atol=1e-5)


def test_prompt_over_max_sequence_length_names_the_fix(pipeline_dir):
    short = load_tiny(SPEC, pipeline_dir, options={"max_sequence_length": 20})
    with pytest.raises(ValueError, match="over model.options.max_sequence_length=20.*Fix: raise"):
        short.encode_prompts(PROMPTS[:1], cfg=False, images=[[condition_image(1)]], resolution=(H, W))


def test_processor_without_torchvision(adapter):
    """Without torchvision the processor is transformers' Qwen2VLProcessor with the PIL image
    processor and no video processor (diffusers loads the usual one where torchvision exists)."""
    from transformers import Qwen2VLProcessor

    processor = adapter.pipeline.processor
    assert type(processor) is Qwen2VLProcessor
    if not has_torchvision():
        assert processor.video_processor is None
        assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
