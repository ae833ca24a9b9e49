"""``z-image``: Z-Image and Z-Image-Turbo on diffusers' ``ZImagePipeline``.

Everything runs through the pipeline's own components:

* prompts: ``pipeline.encode_prompt`` -- the Qwen3 text encoder's second-to-last hidden states
  of the chat-templated prompt, one ragged ``[L_i, D]`` tensor per prompt. flowrl stores them
  padded to ``max_sequence_length``: ``prompt_embeds [B, L, D]`` and ``prompt_mask [B, L]``
  (bool, valid tokens first); :meth:`ZImageAdapter.predict` hands the transformer the unpadded
  list, as the pipeline does;
* the denoiser: ``ZImageTransformer2DModel`` takes a *list* of ``[C, 1, H, W]`` latents and,
  unlike SD3/FLUX, runs on the reversed time ``t = 1 - sigma`` (the pipeline passes
  ``(1000 - timestep) / 1000``) and predicts ``x0 - eps``: the pipeline negates its output before
  the Euler step. :meth:`ZImageAdapter.predict` returns the negated output, i.e. flowrl's
  velocity ``v = eps - x0``;
* classifier-free guidance: the pipeline writes ``pos + g (pos - neg)`` with CFG on for
  ``g > 0``. flowrl's ``guidance_scale`` is the standard ``w`` of ``neg + w (pos - neg)`` (CFG on
  for ``w > 1``), so **w = g + 1**: Z-Image-Turbo's ``g = 0`` is ``w = 1``; Z-Image's usual
  ``g = 3..5`` is ``w = 4..6``. The pipeline's ``cfg_truncation`` (guidance off once
  ``1 - sigma > cfg_truncation``) and ``cfg_normalization`` (cap ``|guided| <= c |pos|`` per
  sample) are options with the pipeline's defaults (off);
* latents: ``[C, H / f, W / f]`` normalized as the pipeline does
  (``(z - shift_factor) * scaling_factor``); ``decode`` inverts it and runs the VAE.

Sigma grid: the pipeline shifts ``linspace(1, 1/N, N)`` (built in float32,
``get_default_z_image_sigmas``) with the scheduler's static ``shift`` (3.0 in Z-Image's scheduler
config); a scheduler config with ``use_dynamic_shifting`` shifts by the resolution's ``mu``
instead (as ``flux1``). Rollouts use exactly the pipeline's grid for their resolution
(:meth:`~shared.models.pipeline.PipelineAdapter.sigmas`) unless ``model.scheduler_shift`` is set
(then flowrl's ``flow_sigmas(N, shift)``). ``scheduler_shift`` is the static shift (or ``exp(mu)``
at ``options.shift_resolution``).

Options (``model.options``): ``max_sequence_length`` (text tokens incl. the chat template,
default 512 as the pipeline), ``cfg_truncation`` (default 1.0 = never), ``cfg_normalization``
(default 0 = off), ``shift_resolution`` (512), ``text_dtype`` / ``vae_dtype`` (frozen parts'
dtype, default float32 on CPU and bfloat16 on CUDA).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shared.models.base import MODELS, Conditioning
from shared.models.pipeline import DTYPE_OPTIONS, PipelineAdapter
from shared.models.prompt_length import MAX_SEQUENCE_FIX

Z_IMAGE_OPTIONS: dict[str, Any] = {"max_sequence_length": 512, "cfg_truncation": 1.0,
                                   "cfg_normalization": 0.0, "shift_resolution": 512, **DTYPE_OPTIONS}


def _pad(embeds: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged ``[L_i, D]`` -> ``[B, length, D]`` zero-padded and the ``[B, length]`` bool mask."""
    out = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), length, dtype=torch.bool, device=embeds[0].device)
    for i, e in enumerate(embeds):
        out[i, : len(e)] = e
        mask[i, : len(e)] = True
    return out, mask


@MODELS.register("z-image")
class ZImageAdapter(PipelineAdapter):
    model_type = "z-image"
    attention_mask = True  # padded prompts attend with a mask (flash / sage backends cannot take one)
    pipeline_class = "ZImagePipeline"
    option_defaults = Z_IMAGE_OPTIONS
    hub_examples = "Tongyi-MAI/Z-Image or Tongyi-MAI/Z-Image-Turbo"
    text_encoders = ("text_encoder",)  # Qwen3
    pipeline_grid = True
    # Flow-Factory's Z-Image targets: the single-stream blocks' attention and SwiGLU feed-forward
    default_lora_targets = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]

    def base_sigmas(self, num_steps: int) -> list[float]:
        """ZImagePipeline's own ``linspace(1, 1/N, N)`` (float32, unlike FLUX's float64)."""
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

        return get_default_z_image_sigmas(num_steps)

    def prompt_token_limits(self) -> list:
        """Counted on the chat-templated text, as ZImagePipeline tokenizes it."""
        def render(prompt: str) -> str:
            return self.pipeline.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                enable_thinking=True)

        return self.tokenizer_limits(("tokenizer", "Qwen3", self.options["max_sequence_length"], MAX_SEQUENCE_FIX),
                                     render=render)

    # ------------------------------------------------------------------ interface
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, cfg: bool,
                       negative_prompts: list[str] | None = None) -> Conditioning:
        """``prompt_embeds [B, L, D]`` and ``prompt_mask [B, L]`` with ``L = max_sequence_length``;
        with ``cfg`` also the negatives (default: empty prompts, as the pipeline)."""
        length = int(self.options["max_sequence_length"])
        # the pipeline rewrites the prompt list in place (chat template): pass copies
        positive, negative = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.device, do_classifier_free_guidance=cfg,
            negative_prompt=list(negative_prompts) if negative_prompts is not None else None,
            max_sequence_length=length)
        dtype = self.transformer.dtype

        def pack(embeds: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            padded, mask = _pad([e.to(dtype) for e in embeds], length)
            return {"prompt_embeds": padded, "prompt_mask": mask}

        return Conditioning(pack(positive), pack(negative) if cfg else None)

    def latent_shape(self, resolution: tuple[int, int]) -> tuple[int, ...]:
        """``[C, H / f, W / f]`` (the transformer's 2x2 patches need multiples of ``2 f``)."""
        h, w = self.latent_hw(resolution, 2, "patch size 2")
        return (self.transformer.config.in_channels, h, w)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 guidance_scale: float, transformer: nn.Module | None = None) -> torch.Tensor:
        """Velocity with Z-Image's CFG: ``v_u + w (v_c - v_u)`` for ``w > 1`` (one batched forward,
        positives first as the pipeline), then ``cfg_truncation`` / ``cfg_normalization``.

        Args:
            latents: ``[B, C, H, W]``; sigma: ``[B]``; guidance_scale: ``w`` (= Z-Image's ``g + 1``).
        Returns:
            float32 ``[B, C, H, W]``.
        """
        module = transformer if transformer is not None else self.transformer
        if guidance_scale <= 1.0 or cond.negative is None:
            return self.predict(module, latents, sigma, cond.tensors).float()
        v_cond, v_uncond = self.cfg_velocities(module, latents, sigma, cond, negatives_first=False)
        guided = v_uncond + guidance_scale * (v_cond - v_uncond)
        c = float(self.options["cfg_normalization"])
        if c > 0:  # per sample: |guided| <= c |v_cond| (the pipeline's norms are over the whole latent)
            dims = tuple(range(1, guided.ndim))
            cap = c * torch.linalg.vector_norm(v_cond, dim=dims, keepdim=True)
            norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
            guided = torch.where(norm > cap, guided * (cap / norm), guided)
        truncated = (1.0 - sigma.float()) > float(self.options["cfg_truncation"])  # [B]
        return torch.where(truncated.view(-1, *[1] * (guided.ndim - 1)), v_cond, guided)

    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity ``eps - x0`` ``[B, C, H, W]`` for ``latents [B, C, H, W]`` at ``sigma [B]``."""
        dtype = self.transformer.dtype
        frames = list(latents.to(dtype).unsqueeze(2).unbind(0))  # B x [C, 1, H, W]
        captions = [e[m] for e, m in zip(cond["prompt_embeds"], cond["prompt_mask"])]
        t = (1000.0 - sigma.float() * 1000.0) / 1000.0  # the pipeline's (1000 - timestep) / 1000
        out = transformer(frames, t, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the model predicts x0 - eps
