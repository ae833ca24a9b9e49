"""``sd3-5``: Stable Diffusion 3 / 3.5 (Medium, Large) on diffusers' ``StableDiffusion3Pipeline``.

Flow-GRPO's model family. Everything runs through the pipeline's own components:

* prompts: ``pipeline.encode_prompt`` (CLIP-L + CLIP-G, and T5 when loaded; without T5 the
  pipeline pads with ``max_sequence_length`` zero tokens, as SD3 was trained with T5 dropped);
* the denoiser: ``SD3Transformer2DModel`` called with ``timestep = 1000 * sigma`` (the
  pipeline's convention), velocity out;
* latents: ``[C, H / f, W / f]`` with ``f`` the VAE scale factor, normalized as the pipeline
  does (``(z - shift_factor) * scaling_factor``); ``decode`` inverts that and runs the VAE.

Options (``model.options``): ``max_sequence_length`` (T5 tokens, default: the pipeline folder's
``flowrl.json`` if present, else 256 like the pipeline), ``drop_t5`` (do not load T5; saves
~10 GB at the price of prompt fidelity), ``text_dtype`` / ``vae_dtype`` (frozen parts' dtype,
default float32 on CPU and bfloat16 on CUDA).

A pipeline folder may carry a ``flowrl.json`` with defaults for the options above (the toy
pipeline of ``shared.toy`` does); explicit ``model.options`` win.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.models.base import MODELS, Conditioning, FlowModelAdapter

SD3_OPTIONS = {"max_sequence_length": 256, "drop_t5": False, "text_dtype": None, "vae_dtype": None}


FOLDER_DEFAULTS = "flowrl.json"


def folder_defaults(path: str | Path) -> dict[str, Any]:
    """``flowrl.json`` in a local pipeline folder (empty for hub ids and folders without one)."""
    file = Path(path) / FOLDER_DEFAULTS
    return json.loads(file.read_text()) if file.is_file() else {}


def write_folder_defaults(path: str | Path, options: dict[str, Any]) -> None:
    """Store the options that differ from :data:`SD3_OPTIONS` in ``path/flowrl.json`` (if any)."""
    keep = {k: v for k, v in options.items() if v != SD3_OPTIONS[k]}
    if keep:
        (Path(path) / FOLDER_DEFAULTS).write_text(json.dumps(keep, indent=2) + "\n")


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@MODELS.register("sd3-5")
class SD3Adapter(FlowModelAdapter):
    model_type = "sd3-5"
    # Flow-GRPO's SD3 LoRA targets: the 8 attention projections of both streams
    default_lora_targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]

    def __init__(self, pipeline, options: dict[str, Any]) -> None:
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.options = options
        self.scheduler_shift = float(pipeline.scheduler.config.get("shift", 1.0))
        for module in (pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2,
                       pipeline.text_encoder_3):
            if module is not None:
                module.requires_grad_(False).eval()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pipeline(cls, pipeline, options: dict[str, Any] | None = None,
                      device: torch.device | str = "cpu") -> "SD3Adapter":
        """Wrap an already built ``StableDiffusion3Pipeline`` (tests, scripts)."""
        o = {**SD3_OPTIONS, **(options or {})}
        device = torch.device(device)
        pipeline.to(device)
        for name, key in (("text_encoder", "text_dtype"), ("text_encoder_2", "text_dtype"),
                          ("text_encoder_3", "text_dtype"), ("vae", "vae_dtype")):
            module, dtype = getattr(pipeline, name), _dtype(o[key], device)
            if module is not None and module.dtype != dtype:
                module.to(dtype)
        return cls(pipeline, o)

    @classmethod
    def load(cls, model_cfg: Any, *, device: torch.device, seed: int) -> "SD3Adapter":
        from diffusers import StableDiffusion3Pipeline

        path = model_cfg.model_name_or_path
        if path is None:
            raise ValueError(
                "model.model_name_or_path is required for model_type 'sd3-5'. Fix: set it to a "
                "hub id (e.g. stabilityai/stable-diffusion-3.5-medium) or a local pipeline folder "
                "(e.g. assets/toy-sd3).")
        unknown = set(model_cfg.options) - set(SD3_OPTIONS)
        if unknown:
            raise ValueError(f"model.options: unknown sd3-5 option(s) {sorted(unknown)}; "
                             f"valid: {sorted(SD3_OPTIONS)}.")
        options = {**SD3_OPTIONS, **folder_defaults(path), **model_cfg.options}
        if Path(path).exists() and not (Path(path) / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model.model_name_or_path: {path!r} is a local path without model_index.json, so "
                f"it is not a diffusers pipeline folder. Fix: point it at a folder written by "
                f"StableDiffusion3Pipeline.save_pretrained (or a hub id).")
        # components saved as None (no T5, no image encoder) must be passed as None explicitly
        index = StableDiffusion3Pipeline.load_config(path)
        extra = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
        if options["drop_t5"]:
            extra.update(text_encoder_3=None, tokenizer_3=None)
        pipeline = StableDiffusion3Pipeline.from_pretrained(path, **extra)
        pipeline.set_progress_bar_config(disable=True)
        adapter = cls.from_pipeline(pipeline, options, device)
        if model_cfg.scheduler_shift is not None:
            adapter.scheduler_shift = float(model_cfg.scheduler_shift)
        return adapter

    def save_pretrained(self, path: str) -> None:
        self.pipeline.save_pretrained(path)
        write_folder_defaults(path, self.options)

    # ------------------------------------------------------------------ interface
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, cfg: bool,
                       negative_prompts: list[str] | None = None) -> Conditioning:
        pe, npe, pooled, npooled = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=cfg, negative_prompt=negative_prompts,
            max_sequence_length=int(self.options["max_sequence_length"]))
        dtype = self.transformer.dtype
        tensors = {"prompt_embeds": pe.to(dtype), "pooled": pooled.to(dtype)}
        negative = {"prompt_embeds": npe.to(dtype), "pooled": npooled.to(dtype)} if cfg else None
        return Conditioning(tensors, negative)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    def latent_shape(self, resolution: tuple[int, int]) -> tuple[int, ...]:
        h, w = resolution
        step = self.vae_scale_factor * self.transformer.config.patch_size
        if h % step or w % step:
            raise ValueError(
                f"resolution {h}x{w} does not fit sd3-5: height and width must be multiples of "
                f"{step} (VAE factor {self.vae_scale_factor} x patch size "
                f"{self.transformer.config.patch_size}). Fix: change train.resolution / eval.resolution.")
        return (self.transformer.config.in_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)

    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.transformer.dtype
        return transformer(
            hidden_states=latents.to(dtype), timestep=(sigma * 1000.0).to(dtype),
            encoder_hidden_states=cond["prompt_embeds"], pooled_projections=cond["pooled"],
            return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> normalized latents (posterior mean)."""
        vae = self.pipeline.vae
        z = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.mean
        return (z.float() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
