"""The ``wan2_t2v`` adapter against diffusers' own ``WanPipeline.__call__`` on a tiny random pipeline
(tiny UMT5 text encoder, Unigram tokenizer built offline, 4x/4x Wan VAE).

The pinning test is the proof of the conventions: from the same initial noise and on the same sigma
grid, the adapter's ODE rollout reproduces the pipeline's video latents and frames -- with and
without CFG (negative prompts), and with Wan2.2-TI2V's per-token timesteps (``expand_timesteps``;
for text-to-video every token has the same timestep, so that case only shows the path runs) --
which fails for a wrong timestep scale, velocity sign, CFG combination, latent layout or VAE
normalization. WanPipeline's ``__call__`` takes Euler steps only with ``FlowMatchEulerDiscreteScheduler``,
so the pinning pipeline has that scheduler (:func:`build_wan_t2v` with ``euler=True``); Wan's own
UniPC scheduler config (the contract suite's pipeline) gives the grid, checked against UniPC's own.
The generic checks (LoRA, replay, loading, frames) are in ``tests/contract/test_model_contract.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shared.models.wan import valid_frames_near
from shared.sampling import rollout
from tests.helpers.pipeline_tests import (assert_ode_rollout_matches, embedded_trainer_test, initial_noise,
                                         load_tiny, pipeline_fixtures)
from tests.helpers.tiny_pipelines import NEGATIVE, PROMPTS, TINY_PIPELINES, build_wan_t2v, build_wan_t2v_a14b

SPEC = TINY_PIPELINES["wan2_t2v"]
EULER = dataclasses.replace(SPEC, build=lambda seed=0: build_wan_t2v(seed, euler=True))
H, W = SPEC.resolution
FRAMES = SPEC.options["num_frames"]

pipeline_dir, adapter, pipe = pipeline_fixtures(SPEC)
test_one_epoch_of_the_embedded_trainer = embedded_trainer_test(SPEC)


@pytest.fixture(scope="module")
def euler_dir(tmp_path_factory):
    return EULER.save(tmp_path_factory.mktemp("wan_euler") / "pipe")


@pytest.mark.parametrize("w,expand", [(1.0, False), (4.0, False), (4.0, True)],
                         ids=["no-cfg", "cfg", "cfg-expand-timesteps"])
def test_ode_rollout_matches_the_pipeline(euler_dir, w, expand):
    from diffusers import WanPipeline

    adapter = load_tiny(EULER, euler_dir)
    pipe = EULER.load_pipeline(euler_dir)
    if expand:  # Wan2.2-TI2V-5B's text-to-video: one timestep per latent token
        pipe = WanPipeline(**pipe.components, expand_timesteps=True)
        pipe.set_progress_bar_config(disable=True)
        adapter.pipeline.register_to_config(expand_timesteps=True)
    seeds, steps = [0, 1], 3
    noise = initial_noise(adapter, seeds, (H, W))
    assert noise.shape == (2, 4, (FRAMES - 1) // 4 + 1, H // 4, W // 4)
    kwargs = dict(prompt=PROMPTS[:2], negative_prompt=[NEGATIVE] * 2, height=H, width=W, num_frames=FRAMES,
                  num_inference_steps=steps, guidance_scale=w,
                  max_sequence_length=SPEC.options["max_sequence_length"])
    latents = pipe(output_type="latent", latents=noise.clone(), **kwargs).frames
    frames = pipe(output_type="pt", latents=noise.clone(), **kwargs).frames  # [B, F, 3, H, W]
    assert frames.shape == (2, FRAMES, 3, H, W)
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=w > 1, negative_prompts=[NEGATIVE] * 2)
    assert_ode_rollout_matches(adapter, pipe, cond, seeds, (H, W), steps, w, latents, frames)


def test_rollout_grid_is_wans_unipc_grid(adapter, pipe):
    """Wan's scheduler config (UniPC, flow sigmas, flow_shift 3): the adapter's grid is the one
    ``__call__`` sets, at any resolution, with the first sigma (UniPC's ``1 - 1e-6``) at exactly 1."""
    for steps in (4, 10):
        pipe(prompt=[PROMPTS[0]], height=H, width=W, num_frames=1, num_inference_steps=steps,
             max_sequence_length=SPEC.options["max_sequence_length"], output_type="latent")
        expected = pipe.scheduler.sigmas.clone()
        assert 1.0 - 1e-5 < float(expected[0]) < 1.0
        for resolution in ((H, W), (64, 96)):
            got = adapter.sigmas(steps, resolution)
            assert got[0] == 1.0
            torch.testing.assert_close(got[1:], expected[1:], rtol=0, atol=0)
    assert adapter.scheduler_shift == 3.0  # flow_shift


def test_prompts_are_the_pipelines_padded_embeddings(adapter, pipe):
    length = SPEC.options["max_sequence_length"]
    cond = adapter.encode_prompts(PROMPTS[:3], cfg=True)
    embeds, negative = pipe.encode_prompt(PROMPTS[:3], negative_prompt=[""] * 3, max_sequence_length=length,
                                          device="cpu")
    assert cond.tensors["prompt_embeds"].shape == (3, length, 16)
    torch.testing.assert_close(cond.tensors["prompt_embeds"], embeds)
    torch.testing.assert_close(cond.negative["prompt_embeds"], negative)  # default negatives: ""
    assert adapter.encode_prompts(PROMPTS[:1], cfg=False).negative is None


def test_frames_option_and_errors(pipeline_dir):
    assert valid_frames_near(6, 4) == [5, 9] and valid_frames_near(5, 4) == [5] and valid_frames_near(1, 4) == [1]
    nine = load_tiny(SPEC, pipeline_dir, options={"num_frames": 9})
    assert nine.latent_shape((H, W))[1] == 3
    fix = r"model.options.num_frames=8 .*4k \+ 1.*Fix: set model.options.num_frames to 5 or 9"
    with pytest.raises(ValueError, match=fix):
        load_tiny(SPEC, pipeline_dir, options={"num_frames": 8})


A14B = TINY_PIPELINES["wan2_t2v-a14b"]


@pytest.fixture(scope="module")
def a14b_euler_dir(tmp_path_factory):
    # Euler steps in __call__; boundary 0.7 on the 3-step shift-3 grid (1, 0.857, 0.6): two
    # high-noise steps, then one low-noise step
    spec = dataclasses.replace(A14B, build=lambda seed=0: build_wan_t2v_a14b(seed, boundary_ratio=0.7, euler=True))
    return spec.save(tmp_path_factory.mktemp("wan_a14b") / "pipe")


def test_two_experts_match_the_pipeline(a14b_euler_dir):
    """Wan2.2-A14B: the adapter's ODE rollout with both experts, each with its own CFG weight
    (``guidance_scale`` / ``options.guidance_scale_2``), reproduces ``WanPipeline.__call__``'s
    latents and frames; the high-noise expert takes exactly the steps at or above the boundary."""
    from shared.models.experts import TwoExperts

    spec = dataclasses.replace(A14B, options={**A14B.options, "guidance_scale_2": 2.0})
    adapter = load_tiny(spec, a14b_euler_dir)
    pipe = A14B.load_pipeline(a14b_euler_dir)
    assert isinstance(adapter.transformer, TwoExperts) and adapter.transformer.boundary == pytest.approx(700.0)
    seeds, steps, w = [0, 1], 3, 4.0
    calls = {"transformer": 0, "transformer_2": 0}
    hooks = [module.register_forward_hook(lambda m, a, kw, name=name: calls.__setitem__(name, calls[name] + 1))
             for name, module in adapter.transformer.parts()]
    noise = initial_noise(adapter, seeds, (H, W))
    kwargs = dict(prompt=PROMPTS[:2], negative_prompt=[NEGATIVE] * 2, height=H, width=W, num_frames=FRAMES,
                  num_inference_steps=steps, guidance_scale=w, guidance_scale_2=2.0,
                  max_sequence_length=SPEC.options["max_sequence_length"])
    latents = pipe(output_type="latent", latents=noise.clone(), **kwargs).frames
    frames = pipe(output_type="pt", latents=noise.clone(), **kwargs).frames
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=True, negative_prompts=[NEGATIVE] * 2)
    try:
        assert_ode_rollout_matches(adapter, pipe, cond, seeds, (H, W), steps, w, latents, frames)
    finally:
        for h in hooks:
            h.remove()
    sigmas = adapter.sigmas(steps, (H, W))
    high = int((sigmas[:-1] * 1000 >= 700).sum())
    assert 0 < high < steps  # the grid crosses the boundary
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0
    assert calls["transformer"] * (steps - high) == calls["transformer_2"] * high  # same calls per step


def test_two_experts_split_a_batch_at_the_boundary(a14b_euler_dir):
    """A batch whose samples straddle the boundary (training replays) gives each sample its own
    expert's output, and its own CFG weight: the same as calling the experts one sample at a time."""
    spec = dataclasses.replace(A14B, options={**A14B.options, "guidance_scale_2": 2.0})
    adapter = load_tiny(spec, a14b_euler_dir)
    shape = adapter.latent_shape((H, W))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.4])
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=True, negative_prompts=[NEGATIVE] * 2)
    with torch.no_grad():
        both = adapter.velocity(x, sigma, cond, 4.0)
        one = [adapter.velocity(x[i:i + 1], sigma[i:i + 1], cond.select(slice(i, i + 1)), 4.0) for i in range(2)]
        high = adapter.velocity(x[:1], sigma[:1], cond.select(slice(0, 1)), 4.0,
                                transformer=adapter.transformer.transformer)
        low = adapter.velocity(x[1:], sigma[1:], cond.select(slice(1, 2)), 2.0,
                               transformer=adapter.transformer.transformer_2)
    torch.testing.assert_close(both, torch.cat(one), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one[0], high, rtol=1e-5, atol=1e-6)  # sigma 0.9: transformer, CFG 4
    torch.testing.assert_close(one[1], low, rtol=1e-5, atol=1e-6)  # sigma 0.4: transformer_2, CFG 2


def test_two_expert_errors_name_the_fix(pipe):
    from diffusers import WanPipeline

    from shared.models.wan import WanT2VAdapter

    half = WanPipeline(**pipe.components, boundary_ratio=0.875)  # no transformer_2
    with pytest.raises(ValueError, match="needs transformer, transformer_2 and boundary_ratio.*Fix"):
        WanT2VAdapter.from_pipeline(half)
    with pytest.raises(ValueError, match="guidance_scale_2 is the low-noise expert.*Fix: remove"):
        WanT2VAdapter.from_pipeline(pipe, {"guidance_scale_2": 3.0})


def test_video_rewards_are_frame_means(adapter):
    """The reward path scores videos ``[B, F, 3, H, W]``: an image reward (brightness) gets every
    frame and a video's reward is the mean over its frames."""
    from shared.rewards import build_reward
    from shared.rewards.base import score_all
    from shared.rewards.builtin import luma

    cond = adapter.encode_prompts(PROMPTS[:2], cfg=False)
    roll = rollout(
        adapter, cond, [0, 1], resolution=(H, W), sigmas=adapter.sigmas(2, (H, W)), guidance_scale=1.0,
        dynamics="ODE", noise_level=0.0, sde_steps=[])
    videos = roll.images
    assert videos.shape == (2, FRAMES, 3, H, W)
    scores = score_all(build_reward("brightness"), videos, PROMPTS[:2], torch.tensor([0, 0]), batch_size=3)
    expected = torch.stack([luma(videos[b]).mean() for b in range(2)])
    torch.testing.assert_close(scores, expected)
