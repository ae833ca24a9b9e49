"""The ``z-image`` adapter against diffusers' own ``ZImagePipeline.__call__`` on a tiny random pipeline.

Z-Image differs from SD3/FLUX in three conventions, all pinned here by matching the pipeline's
output from the same initial noise with flowrl's ODE rollout: the transformer runs on the reversed
time ``1 - sigma``, predicts ``x0 - eps`` (the pipeline negates it; flowrl's velocity is
``eps - x0``), and its guidance scale ``g`` means ``pos + g (pos - neg)`` (flowrl's standard
``w = g + 1``). CFG truncation and normalization are pinned the same way. The generic checks
(LoRA, replay, loading) are in ``tests/contract/test_model_contract.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.config import ModelConfig
from shared.flow import flow_sigmas
from shared.models import load_adapter
from shared.sampling import per_sample_noise, rollout
from tests.helpers.tiny_pipelines import NEGATIVE, PROMPTS, TINY_PIPELINES, tiny_train_config

SPEC = TINY_PIPELINES["z-image"]
H, W = SPEC.resolution


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return SPEC.save(tmp_path_factory.mktemp("z_image") / "pipe")


def load(pipeline_dir, **options):
    cfg = ModelConfig(model_type="z-image", model_name_or_path=str(pipeline_dir),
                      options={**SPEC.options, **options})
    return load_adapter(cfg, device=torch.device("cpu"), seed=0)


@pytest.fixture(scope="module")
def adapter(pipeline_dir):
    return load(pipeline_dir)


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    return SPEC.load_pipeline(pipeline_dir)


def pipeline_output(pipe, noise, steps, g, output_type, **extra):
    # fresh prompt lists: ZImagePipeline.encode_prompt rewrites the caller's list in place
    return pipe(prompt=list(PROMPTS[:2]), negative_prompt=[NEGATIVE] * 2, height=H, width=W,
                num_inference_steps=steps, guidance_scale=g, latents=noise.clone(),
                max_sequence_length=SPEC.options["max_sequence_length"], output_type=output_type,
                **extra).images


@pytest.mark.parametrize("w", [1.0, 3.0], ids=["no-cfg", "cfg"])
def test_ode_rollout_matches_the_pipeline(adapter, pipe, w):
    seeds, steps = [0, 1], 3
    noise = per_sample_noise([torch.Generator().manual_seed(s) for s in seeds],
                             adapter.latent_shape((H, W)), torch.device("cpu"))
    g = w - 1.0  # Z-Image's guidance scale
    expected = pipeline_output(pipe, noise, steps, g, "latent")
    images = pipeline_output(pipe, noise, steps, g, "pt")

    sigmas = flow_sigmas(steps, adapter.scheduler_shift)  # static shift 3: the pipeline's own grid
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas, rtol=0, atol=1e-6)
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=w > 1, negative_prompts=[NEGATIVE] * 2)
    roll = rollout(adapter, cond, seeds, resolution=(H, W), sigmas=sigmas, guidance_scale=w,
                   dynamics="ODE", noise_level=0.0, sde_steps=[])
    torch.testing.assert_close(roll.final_latents, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(roll.images, images, rtol=0, atol=1e-4)


def test_cfg_truncation_and_normalization_match_the_pipeline(pipeline_dir, pipe):
    """Truncation 0.3 turns guidance off after the first step (1 - sigma > 0.3); normalization
    0.8 caps the guided prediction's norm below the conditional one's, so both act here."""
    adapter = load(pipeline_dir, cfg_truncation=0.3, cfg_normalization=0.8)
    seeds, steps, w = [0, 1], 3, 4.0
    noise = per_sample_noise([torch.Generator().manual_seed(s) for s in seeds],
                             adapter.latent_shape((H, W)), torch.device("cpu"))
    expected = pipeline_output(pipe, noise, steps, w - 1, "latent", cfg_truncation=0.3,
                               cfg_normalization=0.8)
    plain = pipeline_output(pipe, noise, steps, w - 1, "latent")
    assert (expected - plain).abs().max() > 1e-3, "the options do not act in this setting"
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=True, negative_prompts=[NEGATIVE] * 2)
    roll = rollout(adapter, cond, seeds, resolution=(H, W), sigmas=flow_sigmas(steps, adapter.scheduler_shift),
                   guidance_scale=w, dynamics="ODE", noise_level=0.0, sde_steps=[])
    torch.testing.assert_close(roll.final_latents, expected, rtol=0, atol=1e-4)


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


@pytest.mark.parametrize("trainer_type", ["grpo", "nft"])
def test_one_epoch_of_the_embedded_trainer(pipeline_dir, tmp_path, trainer_type):
    """The adapter inside the real loop: rollouts, replay with gradients, the EMA view (nft samples
    from it) and the LoRA-disabled reference (kl_beta), checkpoint."""
    from trainer.loop import train

    cfg = tiny_train_config(SPEC, pipeline_dir, tmp_path, train={"trainer_type": trainer_type, "kl_beta": 0.01})
    summary = train(cfg, quiet=True)
    assert summary["optimizer_steps"] == 1 and summary["samples"] == 4
    assert (Path(summary["checkpoint"]) / "lora" / "pytorch_lora_weights.safetensors").is_file()
