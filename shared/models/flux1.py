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
(``use_dynamic_shifting``). flowrl's grid takes one shift per model (``scheduler_shift``, used by
``shared.flow.flow_sigmas``), so this adapter sets it to the pipeline's ``exp(mu)`` at
``options.shift_resolution`` (default 512, the usual RL training resolution); at that resolution
the flowrl grid equals the pipeline's. Rollouts at another resolution (e.g. 1024 px eval) keep
that shift; set ``model.scheduler_shift`` to override it (:meth:`Flux1Adapter.shift_for_resolution`
gives the pipeline's value for any resolution).

Options (``model.options``): ``max_sequence_length`` (T5 tokens, default 512 as the pipeline),
``shift_resolution`` (see above), ``text_dtype`` / ``vae_dtype`` (frozen parts' dtype, default
float32 on CPU and bfloat16 on CUDA).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.flow import resolution_shift_mu
from shared.models.base import MODELS, Conditioning, FlowModelAdapter

FLUX1_OPTIONS: dict[str, Any] = {"max_sequence_length": 512, "shift_resolution": 512,
                                 "text_dtype": None, "vae_dtype": None}


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _pair(resolution: int | tuple[int, int]) -> tuple[int, int]:
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)


@MODELS.register("flux1")
class Flux1Adapter(FlowModelAdapter):
    model_type = "flux1"
    # Flow-Factory's FLUX.1 targets: attention of both streams (the names also match the single
    # blocks' attn.to_q/k/v) and the double blocks' feed-forwards
    default_lora_targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]

    def __init__(self, pipeline, options: dict[str, Any]) -> None:
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.options = options
        for module in (pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2):
            if module is not None:
                module.requires_grad_(False).eval()
        self.scheduler_shift = self.shift_for_resolution(options["shift_resolution"])

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pipeline(cls, pipeline, options: dict[str, Any] | None = None,
                      device: torch.device | str = "cpu") -> "Flux1Adapter":
        """Wrap an already built ``FluxPipeline`` (tests, scripts)."""
        o = {**FLUX1_OPTIONS, **(options or {})}
        device = torch.device(device)
        pipeline.to(device)
        for name, key in (("text_encoder", "text_dtype"), ("text_encoder_2", "text_dtype"),
                          ("vae", "vae_dtype")):
            module, dtype = getattr(pipeline, name), _dtype(o[key], device)
            if module is not None and module.dtype != dtype:
                module.to(dtype)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, o)

    @classmethod
    def load(cls, model_cfg: Any, *, device: torch.device, seed: int) -> "Flux1Adapter":
        from diffusers import FluxPipeline

        path = model_cfg.model_name_or_path
        if path is None:
            raise ValueError(
                "model.model_name_or_path is required for model_type 'flux1'. Fix: set it to a hub "
                "id (e.g. black-forest-labs/FLUX.1-dev) or a local FluxPipeline folder.")
        unknown = set(model_cfg.options) - set(FLUX1_OPTIONS)
        if unknown:
            raise ValueError(f"model.options: unknown flux1 option(s) {sorted(unknown)}; "
                             f"valid: {sorted(FLUX1_OPTIONS)}.")
        if Path(path).exists() and not (Path(path) / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model.model_name_or_path: {path!r} is a local path without model_index.json, so "
                f"it is not a diffusers pipeline folder. Fix: point it at a folder written by "
                f"FluxPipeline.save_pretrained (or a hub id).")
        # optional components saved as None (image encoder for IP-Adapter) must be passed as None
        index = FluxPipeline.load_config(path)
        extra = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
        pipeline = FluxPipeline.from_pretrained(path, **extra)
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
        """The SD3-style shift equal to the pipeline's sigma schedule at ``resolution``.

        With ``use_dynamic_shifting`` the pipeline shifts by ``mu`` (linear in the number of
        image tokens, diffusers ``calculate_shift``): ``exp(mu)`` for the exponential time shift,
        ``mu`` for the linear one. Otherwise the scheduler's static ``shift``.
        """
        config = self.pipeline.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        h, w = _pair(resolution)
        step = 2 * self.vae_scale_factor
        mu = resolution_shift_mu((h // step) * (w // step),
                                 config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu

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
        h, w = resolution
        step = 2 * self.vae_scale_factor  # VAE factor x the 2x2 packing
        if h % step or w % step:
            raise ValueError(
                f"resolution {h}x{w} does not fit flux1: height and width must be multiples of "
                f"{step} (VAE factor {self.vae_scale_factor} x 2x2 latent packing). Fix: change "
                f"train.resolution / eval.resolution.")
        channels = self.transformer.config.in_channels // 4
        return (channels, h // self.vae_scale_factor, w // self.vae_scale_factor)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 guidance_scale: float, transformer: nn.Module | None = None) -> torch.Tensor:
        """One forward with ``guidance_scale`` as the embedded guidance (FLUX.1 [dev] is
        guidance-distilled; no negative prompt). Returns float32 ``[B, C, H, W]``."""
        module = transformer if transformer is not None else self.transformer
        tensors = dict(cond.tensors)
        if self.transformer.config.guidance_embeds:
            tensors["guidance"] = torch.full((latents.shape[0],), float(guidance_scale),
                                             device=latents.device, dtype=torch.float32)
        return self.predict(module, latents, sigma, tensors).float()

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

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
