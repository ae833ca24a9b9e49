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

Sigma grid: the pipeline shifts ``linspace(1, 1/N, N)`` with the scheduler's static ``shift``
(3.0 in Z-Image's scheduler config) -- exactly ``shared.flow.flow_sigmas(N, shift)``. A scheduler
config with ``use_dynamic_shifting`` gets ``exp(mu)`` at ``options.shift_resolution`` (as ``flux1``).

Options (``model.options``): ``max_sequence_length`` (text tokens incl. the chat template,
default 512 as the pipeline), ``cfg_truncation`` (default 1.0 = never), ``cfg_normalization``
(default 0 = off), ``shift_resolution`` (512), ``text_dtype`` / ``vae_dtype`` (frozen parts'
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

Z_IMAGE_OPTIONS: dict[str, Any] = {"max_sequence_length": 512, "cfg_truncation": 1.0,
                                   "cfg_normalization": 0.0, "shift_resolution": 512,
                                   "text_dtype": None, "vae_dtype": None}


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _pad(embeds: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged ``[L_i, D]`` -> ``[B, length, D]`` zero-padded and the ``[B, length]`` bool mask."""
    out = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), length, dtype=torch.bool, device=embeds[0].device)
    for i, e in enumerate(embeds):
        out[i, : len(e)] = e
        mask[i, : len(e)] = True
    return out, mask


@MODELS.register("z-image")
class ZImageAdapter(FlowModelAdapter):
    model_type = "z-image"
    # Flow-Factory's Z-Image targets: the single-stream blocks' attention and SwiGLU feed-forward
    default_lora_targets = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]

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
                      device: torch.device | str = "cpu") -> "ZImageAdapter":
        """Wrap an already built ``ZImagePipeline`` (tests, scripts)."""
        o = {**Z_IMAGE_OPTIONS, **(options or {})}
        device = torch.device(device)
        pipeline.to(device)
        for name, key in (("text_encoder", "text_dtype"), ("vae", "vae_dtype")):
            module, dtype = getattr(pipeline, name), _dtype(o[key], device)
            if module.dtype != dtype:
                module.to(dtype)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, o)

    @classmethod
    def load(cls, model_cfg: Any, *, device: torch.device, seed: int) -> "ZImageAdapter":
        from diffusers import ZImagePipeline

        path = model_cfg.model_name_or_path
        if path is None:
            raise ValueError(
                "model.model_name_or_path is required for model_type 'z-image'. Fix: set it to a hub "
                "id (e.g. Tongyi-MAI/Z-Image or Tongyi-MAI/Z-Image-Turbo) or a local ZImagePipeline folder.")
        unknown = set(model_cfg.options) - set(Z_IMAGE_OPTIONS)
        if unknown:
            raise ValueError(f"model.options: unknown z-image option(s) {sorted(unknown)}; "
                             f"valid: {sorted(Z_IMAGE_OPTIONS)}.")
        if Path(path).exists() and not (Path(path) / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model.model_name_or_path: {path!r} is a local path without model_index.json, so "
                f"it is not a diffusers pipeline folder. Fix: point it at a folder written by "
                f"ZImagePipeline.save_pretrained (or a hub id).")
        pipeline = ZImagePipeline.from_pretrained(path)
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
        """The SD3-style shift equal to the pipeline's sigma schedule at ``resolution``: the
        scheduler's static ``shift``, or ``exp(mu)`` / ``mu`` with ``use_dynamic_shifting``."""
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
        h, w = resolution
        step = 2 * self.vae_scale_factor  # VAE factor x the transformer's 2x2 patches
        if h % step or w % step:
            raise ValueError(
                f"resolution {h}x{w} does not fit z-image: height and width must be multiples of "
                f"{step} (VAE factor {self.vae_scale_factor} x patch size 2). Fix: change "
                f"train.resolution / eval.resolution.")
        return (self.transformer.config.in_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)

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
        both = {k: torch.cat([cond.tensors[k], cond.negative[k]]) for k in cond.tensors}
        v = self.predict(module, torch.cat([latents, latents]), torch.cat([sigma, sigma]), both)
        v_cond, v_uncond = v.float().chunk(2)
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

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
