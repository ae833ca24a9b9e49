"""What the per-family adapter tests (``tests/shared/test_<family>_adapter.py``) share, on the tiny
pipelines of :mod:`tests.helpers.tiny_pipelines`.

A family's test module gets its module-scoped fixtures and the embedded-trainer smoke test from
one line each::

    SPEC = TINY_PIPELINES["flux1"]
    pipeline_dir, adapter, pipe = pipeline_fixtures(SPEC)
    test_one_epoch_of_the_embedded_trainer = embedded_trainer_test(SPEC)

pytest collects fixtures and tests by the module attribute they are assigned to.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.config import ModelConfig
from shared.models import FlowModelAdapter, load_adapter
from shared.sampling import per_sample_noise, rollout
from tests.helpers.tiny_pipelines import PROMPTS, TinyPipeline, tiny_train_config

CPU = torch.device("cpu")


def load_tiny(spec: TinyPipeline, path: Path, *, options: dict | None = None, **model) -> FlowModelAdapter:
    """The adapter of ``spec.model_type`` loaded from the pipeline folder ``path`` on the CPU, with
    ``options`` over the spec's options (``model`` adds ``ModelConfig`` fields, e.g. ``scheduler_shift``)."""
    cfg = ModelConfig(model_type=spec.model_type, model_name_or_path=str(path),
                      options={**spec.options, **(options or {})}, **model)
    return load_adapter(cfg, device=CPU, seed=0)


def pipeline_fixtures(spec: TinyPipeline):
    """Module-scoped fixtures ``(pipeline_dir, adapter, pipe)``: the tiny pipeline saved once, the
    adapter loaded from it (:func:`load_tiny`), and the plain diffusers pipeline loaded from it."""

    @pytest.fixture(scope="module", name="pipeline_dir")
    def pipeline_dir(tmp_path_factory) -> Path:
        return spec.save(tmp_path_factory.mktemp(spec.model_type.replace("-", "_")) / "pipe")

    @pytest.fixture(scope="module", name="adapter")
    def adapter(pipeline_dir):
        return load_tiny(spec, pipeline_dir)

    @pytest.fixture(scope="module", name="pipe")
    def pipe(pipeline_dir):
        return spec.load_pipeline(pipeline_dir)

    return pipeline_dir, adapter, pipe


def initial_noise(adapter: FlowModelAdapter, seeds: list[int], resolution: tuple[int, int]) -> torch.Tensor:
    """``[B, *latent_shape]`` float32: the rollout's initial noise for ``seeds`` (one generator each)."""
    return per_sample_noise([torch.Generator().manual_seed(s) for s in seeds],
                            adapter.latent_shape(resolution), CPU)


def assert_ode_rollout_matches(adapter: FlowModelAdapter, pipe, cond, seeds: list[int],
                               resolution: tuple[int, int], steps: int, guidance_scale: float,
                               latents: torch.Tensor, images: torch.Tensor | None = None) -> None:
    """The pinning check, right after the pipeline's own ``__call__`` (same noise, ``steps`` and
    ``resolution``) returned ``latents`` (unpacked, ``[B, C, H / f, W / f]``) and ``images``: the
    grid rollouts use (``adapter.sigmas``) is the one the pipeline just denoised on, to the bit,
    and flowrl's ODE rollout of ``cond`` on it reproduces the latents (and images) within 1e-4."""
    sigmas = adapter.sigmas(steps, resolution)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
    roll = rollout(adapter, cond, seeds, resolution=resolution, sigmas=sigmas, guidance_scale=guidance_scale,
                   dynamics="ODE", noise_level=0.0, sde_steps=[], decode=images is not None)
    torch.testing.assert_close(roll.final_latents, latents, rtol=0, atol=1e-4)
    if images is not None:
        torch.testing.assert_close(roll.images, images, rtol=0, atol=1e-4)


def pipeline_grid(pipe, spec: TinyPipeline, resolution: tuple[int, int], steps: int, **call) -> torch.Tensor:
    """The sigma grid ``[steps + 1]`` the pipeline's own ``__call__`` denoised on at ``resolution``
    (its scheduler after one call; ``call`` adds pipeline arguments)."""
    h, w = resolution
    pipe(prompt=[PROMPTS[0]], height=h, width=w, num_inference_steps=steps, output_type="latent",
         max_sequence_length=spec.options["max_sequence_length"],
         generator=torch.Generator().manual_seed(0), **call)
    return pipe.scheduler.sigmas.clone()


def embedded_trainer_test(spec: TinyPipeline):
    """``test_one_epoch_of_the_embedded_trainer[grpo|nft]`` for ``spec`` (uses the
    ``pipeline_dir`` fixture)."""

    @pytest.mark.parametrize("trainer_type", ["grpo", "nft"])
    def test_one_epoch_of_the_embedded_trainer(pipeline_dir, tmp_path, trainer_type):
        """The adapter inside the real loop: rollouts, replay with gradients, the EMA view (nft samples
        from it) and the LoRA-disabled reference (kl_beta), checkpoint."""
        from trainer.loop import train

        cfg = tiny_train_config(spec, pipeline_dir, tmp_path, train={"trainer_type": trainer_type, "kl_beta": 0.01})
        summary = train(cfg, quiet=True)
        assert summary["optimizer_steps"] == 1 and summary["samples"] == 4
        assert (Path(summary["checkpoint"]) / "lora" / "pytorch_lora_weights.safetensors").is_file()

    return test_one_epoch_of_the_embedded_trainer
