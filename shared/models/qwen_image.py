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

Sigma grid (a known difference): the pipeline shifts ``linspace(1, 1/N, N)`` by a
resolution-dependent ``mu`` and then stretches it so the last nonzero sigma is the scheduler's
``shift_terminal`` (0.02 for Qwen-Image). flowrl's grid (``shared.flow.flow_sigmas``) takes one
shift per model: ``scheduler_shift = exp(mu)`` at ``options.shift_resolution`` (default 512), or
``model.scheduler_shift``; it has no terminal stretch, so its last steps are coarser than the
pipeline's. The model math is identical on any given grid (see the pinning test).

Options (``model.options``): ``max_sequence_length`` (prompt tokens, default 512 as the
pipeline's ``__call__``), ``shift_resolution``, ``text_dtype`` / ``vae_dtype`` (frozen parts'
dtype, default float32 on CPU and bfloat16 on CUDA).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.flow import resolution_shift_mu
from shared.models.base import MODELS, Conditioning, FlowModelAdapter

QWEN_IMAGE_OPTIONS: dict[str, Any] = {"max_sequence_length": 512, "shift_resolution": 512,
                                      "text_dtype": None, "vae_dtype": None}


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _token_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm of each packed token of spatial ``[B, C, H, W]`` (a 2x2 patch over all channels),
    broadcast back to ``[B, C, H, W]`` -- the pipeline's ``torch.norm(packed, dim=-1)``."""
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // 2, 2, w // 2, 2)
    norm = torch.linalg.vector_norm(patches, dim=(1, 3, 5), keepdim=True)
    return norm.expand_as(patches).reshape(b, c, h, w)


@MODELS.register("qwen-image")
class QwenImageAdapter(FlowModelAdapter):
    model_type = "qwen-image"
    # attention of both streams and both streams' feed-forwards (Flow-Factory lists the second
    # feed-forward layers as "img_mlp.net.2.proj", a name that matches no module; the Linear is
    # "img_mlp.net.2")
    default_lora_targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                            "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]

    def __init__(self, pipeline, options: dict[str, Any]) -> None:
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.options = options
        for module in (pipeline.vae, pipeline.text_encoder):
            module.requires_grad_(False).eval()
        self.scheduler_shift = self.shift_for_resolution(options["shift_resolution"])

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pipeline(cls, pipeline, options: dict[str, Any] | None = None,
                      device: torch.device | str = "cpu") -> "QwenImageAdapter":
        """Wrap an already built ``QwenImagePipeline`` (tests, scripts)."""
        o = {**QWEN_IMAGE_OPTIONS, **(options or {})}
        if int(o["max_sequence_length"]) > 1024:
            raise ValueError(f"model.options.max_sequence_length={o['max_sequence_length']} exceeds "
                             f"QwenImagePipeline's limit of 1024 prompt tokens. Fix: use at most 1024.")
        device = torch.device(device)
        pipeline.to(device)
        for name, key in (("text_encoder", "text_dtype"), ("vae", "vae_dtype")):
            module, dtype = getattr(pipeline, name), _dtype(o[key], device)
            if module.dtype != dtype:
                module.to(dtype)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, o)

    @classmethod
    def load(cls, model_cfg: Any, *, device: torch.device, seed: int) -> "QwenImageAdapter":
        from diffusers import QwenImagePipeline

        path = model_cfg.model_name_or_path
        if path is None:
            raise ValueError(
                "model.model_name_or_path is required for model_type 'qwen-image'. Fix: set it to a "
                "hub id (e.g. Qwen/Qwen-Image or Qwen/Qwen-Image-2512) or a local QwenImagePipeline folder.")
        unknown = set(model_cfg.options) - set(QWEN_IMAGE_OPTIONS)
        if unknown:
            raise ValueError(f"model.options: unknown qwen-image option(s) {sorted(unknown)}; "
                             f"valid: {sorted(QWEN_IMAGE_OPTIONS)}.")
        if Path(path).exists() and not (Path(path) / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model.model_name_or_path: {path!r} is a local path without model_index.json, so "
                f"it is not a diffusers pipeline folder. Fix: point it at a folder written by "
                f"QwenImagePipeline.save_pretrained (or a hub id).")
        pipeline = QwenImagePipeline.from_pretrained(path)
        adapter = cls.from_pipeline(pipeline, dict(model_cfg.options), device)
        if model_cfg.scheduler_shift is not None:
            adapter.scheduler_shift = float(model_cfg.scheduler_shift)
        return adapter

    def save_pretrained(self, path: str) -> None:
        self.pipeline.save_pretrained(path)

    # ------------------------------------------------------------------ conventions
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    def shift_for_resolution(self, resolution: int | tuple[int, int]) -> float:
        """The SD3-style shift equal to the pipeline's ``mu`` shift at ``resolution`` (``exp(mu)``
        for the exponential time shift, ``mu`` for the linear one; the static ``shift`` without
        ``use_dynamic_shifting``). The pipeline's ``shift_terminal`` stretch is not included."""
        config = self.pipeline.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
        step = 2 * self.vae_scale_factor
        mu = resolution_shift_mu((h // step) * (w // step),
                                 config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu

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
        h, w = resolution
        step = 2 * self.vae_scale_factor  # VAE factor x the 2x2 packing
        if h % step or w % step:
            raise ValueError(
                f"resolution {h}x{w} does not fit qwen-image: height and width must be multiples of "
                f"{step} (VAE factor {self.vae_scale_factor} x 2x2 latent packing). Fix: change "
                f"train.resolution / eval.resolution.")
        channels = self.transformer.config.in_channels // 4
        return (channels, h // self.vae_scale_factor, w // self.vae_scale_factor)

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
        both = {k: torch.cat([cond.negative[k], cond.tensors[k]]) for k in cond.tensors}
        v = self.predict(module, torch.cat([latents, latents]), torch.cat([sigma, sigma]), both)
        v_uncond, v_cond = v.float().chunk(2)
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
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, torch.float32)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, torch.float32)
        z = latents.float().unsqueeze(2) * std + mean  # [B, C, 1, H, W]
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
