"""``qwen-image``: Qwen-Image (and Qwen-Image-2512) on diffusers' ``QwenImagePipeline``.

Everything runs through the pipeline's own components and helpers:

* prompts: ``pipeline.encode_prompt`` -- Qwen2.5-VL's last hidden states of the templated prompt
  with the system-prompt tokens dropped, padded to the longest prompt with a mask. flowrl stores
  them padded to ``max_sequence_length`` (``prompt_embeds [B, L, D]``, ``prompt_mask [B, L]``,
  valid tokens first) so batches concatenate; :meth:`QwenImageAdapter.predict` trims the padding
  to the longest prompt of the batch before the transformer (the masked tokens change nothing);
* guidance: true classifier-free guidance with a negative prompt, the pipeline's
  ``true_cfg_scale`` = flowrl's ``guidance_scale`` (on for ``w > 1``), including Qwen-Image's
  rescaling of the guided prediction to the conditional one's norm per latent token (a 2x2
  patch of all channels); no guidance embedding;
* the denoiser: ``QwenImageTransformer2DModel`` on packed 2x2-patch tokens with
  ``timestep = sigma`` (the pipeline passes ``t / 1000``), velocity out (``v = eps - x0``). flowrl
  keeps latents spatial, ``[C, H / f, W / f]``; :meth:`QwenImageAdapter.predict` packs with the
  pipeline's ``_pack_latents`` and unpacks with ``_unpack_latents`` (which adds the VAE's frame
  axis, dropped again);
* VAE (``AutoencoderKLQwenImage``, a video VAE run on one frame): latents normalized per channel
  as the pipeline does, ``(z - latents_mean) / latents_std``; ``decode`` inverts it.

Sigma grid: the pipeline shifts ``linspace(1, 1/N, N)`` by a resolution-dependent ``mu`` and
then stretches it so the last nonzero sigma is the scheduler's ``shift_terminal`` (0.02 for
Qwen-Image). Rollouts use exactly that grid for their resolution, stretch included
(:meth:`~shared.models.pipeline.PipelineAdapter.sigmas`). Setting ``model.scheduler_shift``
replaces it by flowrl's ``flow_sigmas(N, shift)`` (no stretch). ``scheduler_shift`` (the
one-number summary) is ``exp(mu)`` at ``options.shift_resolution`` (default 512) and leaves the
stretch out.

Options (``model.options``): ``max_sequence_length`` (prompt tokens, default 512 as the
pipeline's ``__call__``), ``shift_resolution``, ``text_dtype`` / ``vae_dtype`` (frozen parts'
dtype, default float32 on CPU and bfloat16 on CUDA).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shared.models.base import MODELS, Conditioning
from shared.models.pipeline import DTYPE_OPTIONS, PipelineAdapter
from shared.models.prompt_length import MAX_SEQUENCE_FIX, TokenLimit, tokens

QWEN_IMAGE_OPTIONS: dict[str, Any] = {"max_sequence_length": 512, "shift_resolution": 512, **DTYPE_OPTIONS}
#: QwenImagePipeline rejects longer prompts
MAX_SEQUENCE_LENGTH = 1024


def _token_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm of each packed token of spatial ``[B, C, H, W]`` (a 2x2 patch over all channels),
    broadcast back to ``[B, C, H, W]`` -- the pipeline's ``torch.norm(packed, dim=-1)``."""
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // 2, 2, w // 2, 2)
    norm = torch.linalg.vector_norm(patches, dim=(1, 3, 5), keepdim=True)
    return norm.expand_as(patches).reshape(b, c, h, w)


@MODELS.register("qwen-image")
class QwenImageAdapter(PipelineAdapter):
    model_type = "qwen-image"
    attention_mask = True  # padded prompts attend with a mask (flash / sage backends cannot take one)
    pipeline_class = "QwenImagePipeline"
    option_defaults = QWEN_IMAGE_OPTIONS
    hub_examples = "Qwen/Qwen-Image or Qwen/Qwen-Image-2512"
    text_encoders = ("text_encoder",)  # Qwen2.5-VL
    pipeline_grid = True
    unused_parameters = True  # the last block's text-stream outputs feed nothing
    # attention of both streams and both streams' feed-forwards (Flow-Factory lists the second
    # feed-forward layers as "img_mlp.net.2.proj", a name that matches no module; the Linear is
    # "img_mlp.net.2")
    default_lora_targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                            "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        if int(options["max_sequence_length"]) > MAX_SEQUENCE_LENGTH:
            raise ValueError(f"model.options.max_sequence_length={options['max_sequence_length']} exceeds "
                             f"QwenImagePipeline's limit of {MAX_SEQUENCE_LENGTH} prompt tokens. Fix: use "
                             f"at most {MAX_SEQUENCE_LENGTH}.")

    def prompt_token_limits(self) -> list:
        """QwenImagePipeline wraps the prompt in its template, drops the template's first
        ``prompt_template_encode_start_idx`` tokens and keeps ``max_sequence_length`` of the rest."""
        pipe = self.pipeline
        if getattr(pipe, "tokenizer", None) is None:
            return []
        limit = min(int(self.options["max_sequence_length"]), pipe.tokenizer_max_length)
        drop = pipe.prompt_template_encode_start_idx
        return [TokenLimit("Qwen2.5-VL (tokenizer)", limit,
                           lambda p: tokens(pipe.tokenizer, pipe.prompt_template_encode.format(p)) - drop,
                           MAX_SEQUENCE_FIX)]

    # ------------------------------------------------------------------ interface
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, cfg: bool,
                       negative_prompts: list[str] | None = None) -> Conditioning:
        """``prompt_embeds [B, L, D]`` and ``prompt_mask [B, L]`` with ``L = max_sequence_length``;
        with ``cfg`` also the negatives (default: empty prompts)."""
        length = int(self.options["max_sequence_length"])
        dtype = self.transformer.dtype

        def encode(texts: list[str]) -> dict[str, torch.Tensor]:
            embeds, mask = self.pipeline.encode_prompt(prompt=list(texts), device=self.device,
                                                       max_sequence_length=length)
            b, n, d = embeds.shape
            if mask is None:  # the pipeline drops an all-ones mask
                mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
            padded = embeds.new_zeros(b, length, d, dtype=dtype)
            padded[:, :n] = embeds.to(dtype)
            full = torch.zeros(b, length, dtype=torch.bool, device=embeds.device)
            full[:, :n] = mask.bool()
            return {"prompt_embeds": padded, "prompt_mask": full}

        negative = None
        if cfg:
            negative = encode(list(negative_prompts) if negative_prompts is not None else [""] * len(prompts))
        return Conditioning(encode(prompts), negative)

    def latent_shape(self, resolution: tuple[int, int]) -> tuple[int, ...]:
        return self.packed_latent_shape(resolution)  # spatial; predict packs 2x2 patches

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 guidance_scale: float, transformer: nn.Module | None = None) -> torch.Tensor:
        """Qwen-Image's true CFG: ``g = v_u + w (v_c - v_u)`` rescaled per token to ``|v_c|``,
        for ``w > 1`` with negatives (one batched forward); else the conditional velocity.

        Args:
            latents: ``[B, C, H, W]``; sigma: ``[B]``; guidance_scale: ``true_cfg_scale``.
        Returns:
            float32 ``[B, C, H, W]``.
        """
        module = transformer if transformer is not None else self.transformer
        if guidance_scale <= 1.0 or cond.negative is None:
            return self.predict(module, latents, sigma, cond.tensors).float()
        v_cond, v_uncond = self.cfg_velocities(module, latents, sigma, cond)
        guided = v_uncond + guidance_scale * (v_cond - v_uncond)
        return guided * (_token_norm(v_cond) / _token_norm(guided))

    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity ``[B, C, H, W]`` for spatial ``latents [B, C, H, W]`` at ``sigma [B]``."""
        b, c, h, w = latents.shape
        dtype = self.transformer.dtype
        packed = self.pipeline._pack_latents(latents.to(dtype), b, c, h, w)  # [B, HW/4, 4C]
        length = int(cond["prompt_mask"].sum(1).max())  # drop the padding beyond the longest prompt
        mask = cond["prompt_mask"][:, :length]
        timestep = (sigma * 1000.0).to(dtype) / 1000  # exactly what the pipeline passes
        out = transformer(
            hidden_states=packed, timestep=timestep, guidance=None,
            encoder_hidden_states=cond["prompt_embeds"][:, :length],
            encoder_hidden_states_mask=None if bool(mask.all()) else mask.long(),
            img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        f = self.vae_scale_factor
        return self.pipeline._unpack_latents(out, h * f, w * f, f).squeeze(2)

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> ``(z - latents_mean) / latents_std`` (the video VAE's
        posterior mean on one frame): what :meth:`decode` inverts."""
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(self.device, torch.float32)
        std = torch.tensor(vae.config.latents_std).view(shape).to(self.device, torch.float32)
        z = vae.encode((images * 2 - 1).unsqueeze(2).to(self.device, vae.dtype)).latent_dist.mean
        return ((z.float() - mean) / std)[:, :, 0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, H / f, W / f]`` normalized per channel, ``(z - latents_mean) /
        latents_std`` -> images ``[B, 3, H, W]`` in [0, 1] (the video VAE on one frame)."""
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, torch.float32)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, torch.float32)
        z = latents.float().unsqueeze(2) * std + mean  # [B, C, 1, H, W]
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
