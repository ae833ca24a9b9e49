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

from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.models.base import MODELS, Conditioning
from shared.models.pipeline import DTYPE_OPTIONS, PipelineAdapter
from shared.models.prompt_length import CLIP_FIX, MAX_SEQUENCE_FIX

SD3_OPTIONS = {"max_sequence_length": 256, "drop_t5": False, **DTYPE_OPTIONS}


@MODELS.register("sd3-5")
class SD3Adapter(PipelineAdapter):
    model_type = "sd3-5"
    pipeline_class = "StableDiffusion3Pipeline"
    option_defaults = SD3_OPTIONS
    hub_examples = "stabilityai/stable-diffusion-3.5-medium"
    local_example = "assets/toy-sd3"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5
    folder_defaults = True
    # Flow-GRPO's SD3 LoRA targets: the 8 attention projections of both streams
    default_lora_targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]

    @classmethod
    def skipped_components(cls, options: dict[str, Any]) -> list[str]:
        return ["text_encoder_3", "tokenizer_3"] if options["drop_t5"] else []

    def prompt_token_limits(self) -> list:
        clip = self.pipeline.tokenizer_max_length  # 77
        return self.tokenizer_limits(("tokenizer", "CLIP-L", clip, CLIP_FIX), ("tokenizer_2", "CLIP-G", clip, CLIP_FIX),
                                     ("tokenizer_3", "T5", self.options["max_sequence_length"], MAX_SEQUENCE_FIX))

    # ------------------------------------------------------------------ interface
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

    def latent_shape(self, resolution: tuple[int, int]) -> tuple[int, ...]:
        patch = self.transformer.config.patch_size
        h, w = self.latent_hw(resolution, patch, f"patch size {patch}")
        return (self.transformer.config.in_channels, h, w)

    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.transformer.dtype
        return transformer(
            # float32 as the pipeline passes it (scheduler.timesteps): bf16 rounded 964.29 to 964, 818.18 to 820
            hidden_states=latents.to(dtype), timestep=sigma.float() * 1000.0,
            encoder_hidden_states=cond["prompt_embeds"], pooled_projections=cond["pooled"],
            return_dict=False)[0]


def write_folder_defaults(path: str | Path, options: dict[str, Any]) -> None:
    """Store the options that differ from :data:`SD3_OPTIONS` in ``path/flowrl.json`` (if any);
    the toy pipeline (``shared.toy.pipeline.save_toy_pipeline``) writes its defaults with it."""
    SD3Adapter.write_folder_defaults(path, options)
