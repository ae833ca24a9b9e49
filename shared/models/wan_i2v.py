"""``wan2_i2v``: Wan image-to-video (Wan2.1-I2V-14B-480P/720P, Wan2.2-TI2V-5B, Wan2.2-I2V-A14B) on
diffusers' ``WanImageToVideoPipeline``: everything of ``wan2_t2v`` (:mod:`shared.models.wan`, also its
two experts for Wan2.2-I2V-A14B, which conditions like Wan2.1-I2V without an image encoder), plus ONE
condition image per sample, the video's first frame, encoded as the pipeline's ``__call__`` does:

* the image is resized to the rollout's ``(H, W)`` (``video_processor.preprocess``, as the
  pipeline), and ``pipeline.prepare_latents`` builds its conditioning for ``num_frames`` frames;
* Wan2.1-I2V (no ``expand_timesteps``): ``condition [B, t + C, F', h, w]`` -- the first-frame mask
  (``t`` = the VAE's temporal factor channels) and the VAE latents of the video "image, then black
  frames" -- is concatenated to the latents on the channel axis before every transformer call;
  with a CLIP image encoder (the transformer's ``image_dim``) also ``image_embeds [B, N, D]`` (its
  penultimate hidden states), which the transformer cross-attends to;
* Wan2.2-TI2V (``expand_timesteps``): ``image_latents [B, C, 1, h, w]`` replace the first latent
  frame before every transformer call, whose tokens get timestep 0. flowrl's step then moves the
  first frame straight to the image latents (velocity ``(x - c) / sigma`` there, so the last step
  lands on ``c`` exactly), where the pipeline overwrites it after its loop: the same video, and
  no trainable randomness in a frame the model does not generate.

Both branches of CFG get the same image conditioning (as the pipeline). The conditioning depends on
``num_frames`` (Wan2.1), so ``encode_prompts`` takes it (``shared.sampling.encode`` passes the
rollout's). Condition latents are encoded once per distinct image of a batch (a group's members
share theirs). Options: those of ``wan2_t2v``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torch import nn

from shared.models.base import MODELS, Conditioning
from shared.models.edit import ImageConditioned
from shared.models.wan import WanT2VAdapter


@MODELS.register("wan2_i2v")
class WanI2VAdapter(ImageConditioned, WanT2VAdapter):
    model_type = "wan2_i2v"
    pipeline_class = "WanImageToVideoPipeline"
    hub_examples = ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers, Wan-AI/Wan2.2-TI2V-5B-Diffusers or "
                    "Wan-AI/Wan2.2-I2V-A14B-Diffusers")
    text_encoders = ("text_encoder", "image_encoder")  # UMT5, CLIP ViT-H (Wan2.1 only)
    condition_images = (1, 1)

    @property
    def expand_timesteps(self) -> bool:
        return bool(self.pipeline.config.get("expand_timesteps", False))

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, cfg: bool, negative_prompts: list[str] | None = None,
                       images: Sequence[Sequence[Image.Image]] | None = None,
                       resolution: tuple[int, int] | None = None, num_frames: int | None = None) -> Conditioning:
        """``prompt_embeds [B, L, D]`` (with ``cfg`` also the negatives) and the first-frame
        conditioning of ``images`` (one RGB image per prompt) at ``resolution`` for ``num_frames``
        frames (``None``: ``options.num_frames``): ``condition`` (+ ``image_embeds``) or
        ``image_latents`` (see the module docstring), the same for both CFG branches."""
        rows = self.condition_rows(images, len(prompts))
        if resolution is None:
            raise ValueError(f"{self.model_type} sizes the condition image to the video: give encode_prompts the "
                             f"rollout resolution (shared.sampling.encode does).")
        text = WanT2VAdapter.encode_prompts(self, prompts, cfg=cfg, negative_prompts=negative_prompts)
        unique, index = self.distinct(rows)
        parts = [self.encode_condition(row[0], tuple(resolution), num_frames) for row in unique]
        extra = {k: torch.cat([p[k] for p in parts])[index.to(self.device)] for k in parts[0]}
        negative = None if text.negative is None else {**text.negative, **extra}
        return Conditioning({**text.tensors, **extra}, negative)

    def encode_condition(self, image: Image.Image, resolution: tuple[int, int],
                         num_frames: int | None) -> dict[str, torch.Tensor]:
        """One image's conditioning, each ``[1, ...]`` (``pipeline.encode_image`` and
        ``pipeline.prepare_latents`` as ``__call__`` runs them)."""
        pipe, dtype = self.pipeline, self.transformer.dtype
        shape = self.sample_shape(resolution, num_frames)  # checks frames and resolution
        frames = (shape[1] - 1) * self.temporal_factor + 1
        h, w = resolution
        out = {}
        if not self.expand_timesteps and self.transformer.config.image_dim is not None:
            out["image_embeds"] = pipe.encode_image(image, self.device).to(dtype)
        pixels = pipe.video_processor.preprocess(image, height=h, width=w).to(self.device, torch.float32)
        placeholder = torch.zeros(1, *shape, device=self.device)  # prepare_latents draws no noise then
        prepared = pipe.prepare_latents(pixels, 1, shape[0], h, w, frames, torch.float32, self.device, None,
                                        placeholder)
        if self.expand_timesteps:  # (latents, image latents [1, C, 1, h, w], mask)
            out["image_latents"] = prepared[1].float()  # float32: the last step lands on it exactly
        else:  # (latents, [mask; condition latents] [1, t + C, F', h, w])
            out["condition"] = prepared[1].to(dtype)
        return out

    # ------------------------------------------------------------------ the step
    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity ``[B, C, F', h, w]`` for ``latents [B, C, F', h, w]`` at ``sigma [B]`` given the
        first-frame conditioning in ``cond`` (float32 with ``image_latents``)."""
        dtype = self.transformer.dtype
        timestep = sigma.float() * 1000.0
        if "condition" in cond:  # Wan2.1-I2V: mask and condition latents on the channel axis
            hidden = torch.cat([latents.to(dtype), cond["condition"].to(dtype)], dim=1)
        else:  # Wan2.2-TI2V: the first latent frame is the image's, with timestep 0
            image = cond["image_latents"]
            hidden = torch.cat([image.to(latents.dtype), latents[:, :, 1:]], dim=2).to(dtype)
            b, _, f, h, w = latents.shape
            p = self.transformer.config.patch_size
            per_frame = (h // p[1]) * (w // p[2])
            mask = torch.ones(f // p[0], per_frame, device=latents.device)
            mask[0] = 0
            timestep = (mask.flatten()[None] * timestep[:, None])  # [B, F' h w / 4]
        out = transformer(hidden_states=hidden, timestep=timestep, encoder_hidden_states=cond["prompt_embeds"],
                          encoder_hidden_states_image=cond.get("image_embeds"), return_dict=False)[0]
        if "image_latents" not in cond:
            return out
        v = out.float()
        first = (latents[:, :, :1].float() - cond["image_latents"].float()) / sigma.float().view(-1, 1, 1, 1, 1)
        return torch.cat([first, v[:, :, 1:]], dim=2)
