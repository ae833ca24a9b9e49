"""The ``flux2`` and ``flux2-klein`` adapters against diffusers' own ``Flux2Pipeline.__call__`` and
``Flux2KleinPipeline.__call__`` on tiny random pipelines.

The pinning test is the proof of the conventions: from the same initial noise, the adapter's
deterministic rollout (flowrl's ODE step on the adapter's sigma grid, ``adapter.sigmas``)
reproduces the pipeline's final latents and images. :func:`test_the_pin_catches_broken_conventions`
shows that it is sharp: a wrong timestep scale (1000 sigma), a flipped velocity sign, a wrong 2x2
patch order, a missing batch-norm de-normalisation, a missing guidance embedding, swapped CFG
branches, FLUX.1's resolution-only ``mu`` or FLUX.2's ``mu`` for another step count each move the
rollout off the pipeline by far more than the tolerance. The grid itself equals the pipeline's at
several resolutions and step counts.
The generic checks (LoRA, replay, loading) are in ``tests/contract/test_model_contract.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import ModelConfig
from shared.flow import flow_sigmas
from shared.models import Conditioning, load_adapter
from shared.sampling import per_sample_noise, rollout
from tests.helpers.pipeline_tests import CPU, assert_ode_rollout_matches, load_tiny, pipeline_grid
from tests.helpers.tiny_pipelines import NEGATIVE, PROMPTS, TINY_PIPELINES, tiny_train_config

STEPS = 3
TOL = 1e-4


@pytest.fixture(scope="module", params=["flux2", "flux2-klein"])
def spec(request):
    return TINY_PIPELINES[request.param]


@pytest.fixture(scope="module")
def pipeline_dir(spec, tmp_path_factory):
    return spec.save(tmp_path_factory.mktemp(spec.model_type.replace("-", "_")) / "pipe")


@pytest.fixture(scope="module")
def adapter(spec, pipeline_dir):
    return load_tiny(spec, pipeline_dir)


@pytest.fixture(scope="module")
def pipe(spec, pipeline_dir):
    return spec.load_pipeline(pipeline_dir)


def pipeline_rollout(spec, pipe, seeds, guidance, negative=None):
    """The pipeline's own ``__call__`` from flowrl's per-seed noise: (latents in flowrl's layout,
    images). The final latents are read from the step callback (packed, normalised, in both
    pipelines) and unpacked with the pipeline's own id scatter."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    h, w = spec.resolution
    f = pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels // 4
    noise = per_sample_noise([torch.Generator().manual_seed(s) for s in seeds], (channels, h // f, w // f), CPU)
    patched = pipe._patchify_latents(noise)  # the pipelines take patchified latents [B, 4C, H/2f, W/2f]
    kwargs = dict(prompt=PROMPTS[:len(seeds)], height=h, width=w, num_inference_steps=STEPS,
                  guidance_scale=guidance, latents=patched.clone(),
                  max_sequence_length=spec.options["max_sequence_length"],
                  text_encoder_out_layers=tuple(spec.options["text_encoder_out_layers"]))
    if negative is not None:  # Flux2KleinPipeline hard-codes "" unless given negative embeddings
        kwargs["negative_prompt_embeds"] = pipe.encode_prompt(
            [negative] * len(seeds), max_sequence_length=spec.options["max_sequence_length"],
            text_encoder_out_layers=kwargs["text_encoder_out_layers"])[0]
    last = {}
    callback = lambda p, i, t, kw: last.update(kw) or {}  # noqa: E731
    images = pipe(output_type="pt", callback_on_step_end=callback, **kwargs).images
    ids = pipe._prepare_latent_ids(patched)
    latents = pipe._unpatchify_latents(Flux2Pipeline._unpack_latents_with_ids(last["latents"], ids))
    return latents, images


def adapter_rollout(adapter, seeds, guidance, negative=None, sigmas=None):
    cond = adapter.encode_prompts(PROMPTS[:len(seeds)], cfg=guidance > 1.0,
                                  negative_prompts=None if negative is None else [negative] * len(seeds))
    resolution = TINY_PIPELINES[adapter.model_type].resolution
    sigmas = adapter.sigmas(STEPS, resolution) if sigmas is None else sigmas  # what rollouts use
    return rollout(adapter, cond, seeds, resolution=resolution, sigmas=sigmas,
                   guidance_scale=guidance, dynamics="ODE", noise_level=0.0, sde_steps=[])


def gap(roll, expected) -> float:
    latents, images = expected
    return max((roll.final_latents - latents).abs().max().item(), (roll.images - images).abs().max().item())


# --------------------------------------------------------------------------- pinning


@pytest.mark.parametrize("guided", [False, True], ids=["no-guidance", "guidance"])
def test_ode_rollout_matches_the_pipeline(spec, adapter, pipe, guided):
    """[dev]: guidance 1 vs 3.5 embedded; [klein]: no CFG vs CFG with the pipeline's "" negative."""
    w = spec.guidance_scale if guided else 1.0
    latents, images = pipeline_rollout(spec, pipe, [0, 1], w)
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=guided)
    assert_ode_rollout_matches(adapter, pipe, cond, [0, 1], spec.resolution, STEPS, w, latents, images)


@pytest.mark.parametrize("spec", ["flux2-klein"], indirect=True)
def test_klein_cfg_with_negative_prompts_matches_the_pipeline(spec, adapter, pipe):
    expected = pipeline_rollout(spec, pipe, [0, 1], spec.guidance_scale, negative=NEGATIVE)
    roll = adapter_rollout(adapter, [0, 1], spec.guidance_scale, negative=NEGATIVE)
    assert gap(roll, expected) < TOL
    # and the negative prompt matters: the pipeline's "" negative gives another rollout
    assert gap(roll, pipeline_rollout(spec, pipe, [0, 1], spec.guidance_scale)) > 10 * TOL


def test_the_pin_catches_broken_conventions(spec, pipeline_dir, pipe, monkeypatch):
    """Each convention, broken on purpose in a fresh adapter, moves the rollout off the pipeline."""
    w, negative = spec.guidance_scale, (NEGATIVE if spec.model_type == "flux2-klein" else None)
    expected = pipeline_rollout(spec, pipe, [0], w, negative)
    adapter = load_tiny(spec, pipeline_dir)
    assert gap(adapter_rollout(adapter, [0], w, negative), expected) < TOL
    predict, patchify = adapter.predict, adapter.pipeline._patchify_latents

    def swapped_patchify(latents):  # 2x2 patches with dx and dy exchanged
        b, c, h, w_ = latents.shape
        x = latents.view(b, c, h // 2, 2, w_ // 2, 2).permute(0, 1, 5, 3, 2, 4)
        return x.reshape(b, c * 4, h // 2, w_ // 2)

    def no_guidance(t, x, s, cond):
        return predict(t, x, s, {k: v for k, v in cond.items() if k != "guidance"})

    breaks = {
        "timestep 1000 sigma": ("predict", lambda t, x, s, c: predict(t, x, 1000 * s, c)),
        "velocity sign": ("predict", lambda t, x, s, c: -predict(t, x, s, c)),
        "patch order": ("patchify", swapped_patchify),
        "no batch-norm de-normalisation": ("_patch_stats", lambda: (torch.zeros(1), torch.ones(1))),
    }
    if spec.model_type == "flux2":
        breaks["guidance not embedded"] = ("predict", no_guidance)
    else:
        def swapped_cfg(x, s, cond, scale, transformer=None):
            swapped = Conditioning(cond.negative, cond.tensors)
            return type(adapter).velocity(adapter, x, s, swapped, scale, transformer)
        breaks["CFG branches swapped"] = ("velocity", swapped_cfg)
    for name, (attr, broken) in breaks.items():
        with monkeypatch.context() as m:
            if attr == "patchify":
                m.setattr(adapter.pipeline, "_patchify_latents", broken)
            else:
                m.setattr(adapter, attr, broken)
            assert gap(adapter_rollout(adapter, [0], w, negative), expected) > 10 * TOL, name
    assert adapter.predict == predict and adapter.pipeline._patchify_latents == patchify
    grids = {"mu for 28 steps": flow_sigmas(STEPS, adapter.shift_for_resolution(spec.resolution, 28)),
             "FLUX.1's calculate_shift mu": flow_sigmas(STEPS, mu=adapter.resolution_mu(spec.resolution))}
    for name, sigmas in grids.items():
        assert gap(adapter_rollout(adapter, [0], w, negative, sigmas=sigmas), expected) > 10 * TOL, name


# --------------------------------------------------------------------------- sigma grid


@pytest.mark.parametrize("resolution", [(32, 32), (64, 64), (32, 96), (512, 512), (1024, 1024)])
@pytest.mark.parametrize("steps", [4, 8, 28])
def test_shift_for_resolution_is_the_pipelines_empirical_mu(adapter, pipe, resolution, steps):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    h, w = resolution
    tokens = (h // adapter.vae_scale_factor // 2) * (w // adapter.vae_scale_factor // 2)
    mu = compute_empirical_mu(tokens, steps)
    assert adapter.shift_for_resolution(resolution, steps) == pytest.approx(math.exp(mu), rel=1e-9)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    torch.testing.assert_close(flow_sigmas(steps, adapter.shift_for_resolution(resolution, steps)),
                               pipe.scheduler.sigmas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("resolution", [(32, 32), (64, 96)])
@pytest.mark.parametrize("steps", [3, 8])
def test_rollout_grid_is_the_pipelines_grid(spec, adapter, pipe, resolution, steps):
    """Rollouts (``adapter.sigmas``) denoise on the grid of the pipeline's own ``__call__`` at their
    resolution and step count (``mu`` differs between all four)."""
    expected = pipeline_grid(pipe, spec, resolution, steps,
                             text_encoder_out_layers=tuple(spec.options["text_encoder_out_layers"]))
    torch.testing.assert_close(adapter.sigmas(steps, resolution), expected, rtol=0, atol=0)


def test_shift_options(spec, pipeline_dir, adapter):
    default = load_adapter(ModelConfig(model_type=spec.model_type, model_name_or_path=str(pipeline_dir),
                                       options={"text_encoder_out_layers": [1, 2, 3]}), device=CPU, seed=0)
    assert default.options["shift_resolution"] == 512
    assert default.scheduler_shift == pytest.approx(adapter.shift_for_resolution(512, 50))
    fixed = load_tiny(spec, pipeline_dir, scheduler_shift=3.0)
    assert fixed.scheduler_shift == 3.0
    torch.testing.assert_close(fixed.sigmas(5, spec.resolution), flow_sigmas(5, 3.0), rtol=0, atol=0)


# --------------------------------------------------------------------------- prompts and guidance


def test_encodes_stacked_text_encoder_layers(spec, adapter, pipe):
    cond = adapter.encode_prompts(PROMPTS[:3], cfg=True, negative_prompts=[NEGATIVE] * 3)
    hidden = pipe.text_encoder.config.get_text_config().hidden_size
    assert cond.tensors["prompt_embeds"].shape == (3, spec.options["max_sequence_length"], 3 * hidden)
    assert 3 * hidden == pipe.transformer.config.joint_attention_dim
    if spec.uses_cfg:  # klein-base: the negatives are encoded like the prompts
        assert cond.negative["prompt_embeds"].shape == cond.tensors["prompt_embeds"].shape
        assert not torch.equal(cond.negative["prompt_embeds"], cond.tensors["prompt_embeds"])
    else:  # dev: guidance-distilled, no negative branch
        assert cond.negative is None


def test_text_encoder_layers_that_do_not_exist_name_the_fix(spec, pipeline_dir):
    with pytest.raises(ValueError, match=r"text encoder has 3 layers.*0\.\.3"):
        load_tiny(spec, pipeline_dir, options={"text_encoder_out_layers": [1, 2, 9]})
    # the pipeline's default layers need a deeper text encoder than the tiny one
    cfg = ModelConfig(model_type=spec.model_type, model_name_or_path=str(pipeline_dir),
                      options={k: v for k, v in spec.options.items() if k != "text_encoder_out_layers"})
    with pytest.raises(ValueError, match="pipeline's default is"):
        load_adapter(cfg, device=CPU, seed=0)


@pytest.mark.parametrize("spec", ["flux2-klein"], indirect=True)
def test_distilled_klein_ignores_guidance_like_the_pipeline(spec, pipeline_dir, pipe):
    adapter = load_tiny(spec, pipeline_dir)
    adapter.pipeline.register_to_config(is_distilled=True)
    pipe.register_to_config(is_distilled=True)
    try:
        with pytest.warns(UserWarning, match="step-distilled"):
            roll = adapter_rollout(adapter, [0, 1], spec.guidance_scale, negative=NEGATIVE)
        assert gap(roll, pipeline_rollout(spec, pipe, [0, 1], spec.guidance_scale)) < TOL
        assert gap(roll, pipeline_rollout(spec, pipe, [0, 1], 1.0)) < TOL  # = no guidance at all
    finally:
        pipe.register_to_config(is_distilled=False)


@pytest.mark.parametrize("spec", ["flux2"], indirect=True)
def test_a_pixtral_tokenizer_without_torchvision_names_the_fix(spec, pipeline_dir, tmp_path):
    """FLUX.2 [dev]'s tokenizer is a PixtralProcessor, which transformers builds only with torchvision."""
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed: PixtralProcessor loads")
    except ImportError:
        pass
    import shutil

    copy = shutil.copytree(pipeline_dir, tmp_path / "pipe")
    index = json.loads((copy / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ImportError, match="pip install torchvision"):
        load_tiny(spec, copy)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("trainer_type", ["grpo", "nft"])
def test_one_epoch_of_the_embedded_trainer(spec, pipeline_dir, tmp_path, trainer_type):
    """The adapter inside the real loop: rollouts, replay with gradients, the EMA view (nft samples
    from it) and the LoRA-disabled reference (kl_beta), checkpoint."""
    from trainer.loop import train

    cfg = tiny_train_config(spec, pipeline_dir, tmp_path, train={"trainer_type": trainer_type, "kl_beta": 0.01})
    summary = train(cfg, quiet=True)
    assert summary["optimizer_steps"] == 1 and summary["samples"] == 4
    assert (Path(summary["checkpoint"]) / "lora" / "pytorch_lora_weights.safetensors").is_file()
