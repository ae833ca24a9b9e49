"""The ``z-image`` adapter against diffusers' own ``ZImagePipeline.__call__`` on a tiny random pipeline.

Z-Image differs from SD3/FLUX in three conventions, all pinned here by matching the pipeline's
output from the same initial noise with flowrl's ODE rollout: the transformer runs on the reversed
time ``1 - sigma``, predicts ``x0 - eps`` (the pipeline negates it; flowrl's velocity is
``eps - x0``), and its guidance scale ``g`` means ``pos + g (pos - neg)`` (flowrl's standard
``w = g + 1``). CFG truncation and normalization are pinned the same way, and the rollout grid
(``adapter.sigmas``) equals the pipeline's at two resolutions. The generic checks (LoRA, replay,
loading) are in ``tests/contract/test_model_contract.py``.
"""

from __future__ import annotations

import pytest
import torch

from shared.flow import flow_sigmas
from tests.helpers.pipeline_tests import (assert_ode_rollout_matches, embedded_trainer_test, initial_noise,
                                         load_tiny, pipeline_fixtures, pipeline_grid)
from tests.helpers.tiny_pipelines import NEGATIVE, PROMPTS, TINY_PIPELINES

SPEC = TINY_PIPELINES["z-image"]
H, W = SPEC.resolution

pipeline_dir, adapter, pipe = pipeline_fixtures(SPEC)
test_one_epoch_of_the_embedded_trainer = embedded_trainer_test(SPEC)


def pipeline_output(pipe, noise, steps, g, output_type, **extra):
    # fresh prompt lists: ZImagePipeline.encode_prompt rewrites the caller's list in place
    return pipe(prompt=list(PROMPTS[:2]), negative_prompt=[NEGATIVE] * 2, height=H, width=W,
                num_inference_steps=steps, guidance_scale=g, latents=noise.clone(),
                max_sequence_length=SPEC.options["max_sequence_length"], output_type=output_type,
                **extra).images


@pytest.mark.parametrize("w", [1.0, 3.0], ids=["no-cfg", "cfg"])
def test_ode_rollout_matches_the_pipeline(adapter, pipe, w):
    seeds, steps = [0, 1], 3
    noise = initial_noise(adapter, seeds, (H, W))
    g = w - 1.0  # Z-Image's guidance scale
    expected = pipeline_output(pipe, noise, steps, g, "latent")
    images = pipeline_output(pipe, noise, steps, g, "pt")

    # static shift 3: flowrl's flow_sigmas gives the pipeline's grid up to float rounding
    torch.testing.assert_close(flow_sigmas(steps, adapter.scheduler_shift), pipe.scheduler.sigmas,
                               rtol=0, atol=1e-6)
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=w > 1, negative_prompts=[NEGATIVE] * 2)
    assert_ode_rollout_matches(adapter, pipe, cond, seeds, (H, W), steps, w, expected, images)


def test_cfg_truncation_and_normalization_match_the_pipeline(pipeline_dir, pipe):
    """Truncation 0.3 turns guidance off after the first step (1 - sigma > 0.3); normalization
    0.8 caps the guided prediction's norm below the conditional one's, so both act here."""
    adapter = load_tiny(SPEC, pipeline_dir, options={"cfg_truncation": 0.3, "cfg_normalization": 0.8})
    seeds, steps, w = [0, 1], 3, 4.0
    noise = initial_noise(adapter, seeds, (H, W))
    expected = pipeline_output(pipe, noise, steps, w - 1, "latent", cfg_truncation=0.3,
                               cfg_normalization=0.8)
    plain = pipeline_output(pipe, noise, steps, w - 1, "latent")
    assert (expected - plain).abs().max() > 1e-3, "the options do not act in this setting"
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=True, negative_prompts=[NEGATIVE] * 2)
    assert_ode_rollout_matches(adapter, pipe, cond, seeds, (H, W), steps, w, expected)


@pytest.mark.parametrize("resolution", [(32, 32), (64, 96)])
def test_rollout_grid_is_the_pipelines_grid(adapter, pipe, resolution):
    """Rollouts (``adapter.sigmas``) denoise on the grid of the pipeline's own ``__call__`` (static
    shift: the same at both resolutions; its float32 ``linspace`` included)."""
    expected = pipeline_grid(pipe, SPEC, resolution, 10, guidance_scale=0.0)
    torch.testing.assert_close(adapter.sigmas(10, resolution), expected, rtol=0, atol=0)


def test_ragged_prompts_are_padded_with_a_mask_and_inputs_are_not_mutated(adapter):
    prompts, negatives = list(PROMPTS[:3]), ["", NEGATIVE, ""]
    cond = adapter.encode_prompts(prompts, cfg=True, negative_prompts=negatives)
    assert prompts == PROMPTS[:3] and negatives == ["", NEGATIVE, ""]  # the pipeline would template them
    length = SPEC.options["max_sequence_length"]
    assert cond.tensors["prompt_embeds"].shape == (3, length, 16)
    mask = cond.tensors["prompt_mask"]
    assert mask.dtype == torch.bool and mask.shape == (3, length)
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1 and bool((lengths < length).all())
    assert bool((cond.tensors["prompt_embeds"][~mask] == 0).all())
    # valid tokens first, then padding
    assert torch.equal(mask, torch.arange(length).expand(3, -1) < lengths[:, None])
