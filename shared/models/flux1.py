"""``flux1``: FLUX.1 [dev] (and [schnell]) on diffusers' ``FluxPipeline``.

Everything runs through the pipeline's own components and helpers:

* prompts: ``pipeline.encode_prompt`` -- CLIP-L pooled output (``pooled``, ``[B, D_clip]``) and
  T5 hidden states (``prompt_embeds``, ``[B, max_sequence_length, D_t5]``);
* guidance: FLUX.1 [dev] is guidance-distilled. The guidance scale is an *input* of the
  transformer (``guidance``, embedded like the timestep), so there is no negative prompt and one
  forward per step. :meth:`Flux1Adapter.velocity` therefore reads flowrl's ``guidance_scale`` as
  the embedded guidance (the pipeline's ``guidance_scale``, 3.5 for [dev]); ``train.guidance_scale``
  must be set to it (the example config does). Models without a guidance embedding
  ([schnell]) ignore it. The pipeline's optional "true CFG" (``true_cfg_scale``) is not used;
* the denoiser: ``FluxTransformer2DModel`` with ``timestep = sigma`` (the pipeline passes
  ``t / 1000`` with ``t = 1000 sigma``) and velocity out (``v = eps - x0``, flowrl's convention);
* latents: flowrl keeps them spatial, ``[C, H / f, W / f]`` (``f`` = VAE scale factor, ``C`` =
  VAE latent channels). :meth:`Flux1Adapter.predict` packs 2x2 patches into tokens with the
  pipeline's ``_pack_latents`` (``[B, HW / 4, 4 C]``), builds ``img_ids`` / ``txt_ids`` like the
  pipeline, and unpacks the output with ``_unpack_latents``;
* VAE: latents are normalized as the pipeline does, ``(z - shift_factor) * scaling_factor``;
  ``decode`` inverts it.

Sigma grid: the pipeline shifts ``linspace(1, 1/N, N)`` with a resolution-dependent ``mu``
(``use_dynamic_shifting``). Rollouts use exactly that grid for their own resolution
(:meth:`~shared.models.pipeline.PipelineAdapter.sigmas`), so a 1024 px evaluation gets the
1024 px grid. Setting ``model.scheduler_shift`` replaces it by flowrl's ``flow_sigmas(N, shift)``
at every resolution. ``scheduler_shift`` (the one-number summary of the grid) is the pipeline's
``exp(mu)`` at ``options.shift_resolution`` (default 512, the usual RL training resolution);
:meth:`~shared.models.pipeline.PipelineAdapter.shift_for_resolution` gives it for any resolution.

Options (``model.options``): ``max_sequence_length`` (T5 tokens, default 512 as the pipeline),
``shift_resolution`` (see above), ``text_dtype`` / ``vae_dtype`` (frozen parts' dtype, default
float32 on CPU and bfloat16 on CUDA).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shared.models.base import MODELS, Conditioning
from shared.models.pipeline import DTYPE_OPTIONS, EmbeddedGuidance, PipelineAdapter
from shared.models.prompt_length import CLIP_FIX, MAX_SEQUENCE_FIX

FLUX1_OPTIONS: dict[str, Any] = {"max_sequence_length": 512, "shift_resolution": 512, **DTYPE_OPTIONS}


@MODELS.register("flux1")
class Flux1Adapter(EmbeddedGuidance, PipelineAdapter):
    model_type = "flux1"
    pipeline_class = "FluxPipeline"
    option_defaults = FLUX1_OPTIONS
    hub_examples = "black-forest-labs/FLUX.1-dev"
    text_encoders = ("text_encoder", "text_encoder_2")  # CLIP-L, T5
    pipeline_grid = True
    # Flow-Factory's FLUX.1 targets: attention of both streams (the names also match the single
    # blocks' attn.to_q/k/v) and the double blocks' feed-forwards
    default_lora_targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]

    def prompt_token_limits(self) -> list:
        return self.tokenizer_limits(("tokenizer", "CLIP-L", self.pipeline.tokenizer_max_length, CLIP_FIX),
                                     ("tokenizer_2", "T5", self.options["max_sequence_length"], MAX_SEQUENCE_FIX))

    # ------------------------------------------------------------------ interface
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, cfg: bool,
                       negative_prompts: list[str] | None = None) -> Conditioning:
        """``prompt_embeds [B, L, D_t5]`` and ``pooled [B, D_clip]``. Guidance-distilled: ``cfg``
        and ``negative_prompts`` are ignored (no negative branch, see :meth:`velocity`)."""
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device,
            max_sequence_length=int(self.options["max_sequence_length"]))
        dtype = self.transformer.dtype
        return Conditioning({"prompt_embeds": prompt_embeds.to(dtype), "pooled": pooled.to(dtype)})

    def latent_shape(self, resolution: tuple[int, int]) -> tuple[int, ...]:
        return self.packed_latent_shape(resolution)  # spatial; predict packs 2x2 patches

    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity ``[B, C, H, W]`` for spatial ``latents [B, C, H, W]`` at ``sigma [B]``.

        ``cond``: ``prompt_embeds``, ``pooled`` and, for guidance-distilled models, ``guidance [B]``.
        """
        b, c, h, w = latents.shape
        dtype, device = self.transformer.dtype, latents.device
        packed = self.pipeline._pack_latents(latents.to(dtype), b, c, h, w)  # [B, HW/4, 4C]
        img_ids = self.pipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
        timestep = (sigma * 1000.0).to(dtype) / 1000  # exactly what the pipeline passes
        out = transformer(
            hidden_states=packed, timestep=timestep, guidance=cond.get("guidance"),
            pooled_projections=cond["pooled"], encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        f = self.vae_scale_factor
        return self.pipeline._unpack_latents(out, h * f, w * f, f)
