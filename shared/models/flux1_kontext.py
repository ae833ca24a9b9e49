"""``flux1-kontext``: FLUX.1 Kontext [dev] on diffusers' ``FluxKontextPipeline`` (image editing).

Everything of ``flux1`` holds (prompts: CLIP pooled + T5; embedded guidance, one forward per step;
the resolution-dependent sigma grid of the *target* tokens; spatial latents ``[C, H / f, W / f]``;
the VAE's shift and scale), plus ONE condition image per sample, encoded as the pipeline's
``__call__`` encodes its ``image``:

* size: ``options.condition_size: output`` (default) resizes it to the rollout's ``(H, W)``
  (the pipeline called with ``height = H, width = W``, ``_auto_resize=False`` and an image of that
  size does the same); ``pipeline`` picks the entry of diffusers' ``PREFERRED_KONTEXT_RESOLUTIONS``
  closest to the image's aspect ratio, floored to a multiple of ``2 f``, like ``__call__`` with
  ``_auto_resize=True`` (about 1 megapixel: several times the target tokens at RL resolutions);
* pixels: ``pipeline.image_processor.resize`` then ``.preprocess`` (``[-1, 1]``); latents:
  ``pipeline._encode_vae_image`` (the VAE posterior's mode, ``(z - shift) * scale``), kept spatial
  in the conditioning as ``image_latents [B, C, h, w]`` (each distinct image encoded once);
* the step (:meth:`Flux1KontextAdapter.predict`, used by rollouts and the trainer's replay alike):
  target and condition latents packed into 2x2-patch tokens, the condition tokens appended after
  the target tokens, their position ids those of ``prepare_latents`` (``(1, row, col)``; targets
  ``(0, row, col)``), and the velocity of the target tokens only (``noise_pred[:, :N]``).

Options: ``flux1``'s (``max_sequence_length``, ``shift_resolution``, ``text_dtype``, ``vae_dtype``)
and ``condition_size``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from shared.models.base import MODELS, Conditioning
from shared.models.edit import ImageConditioned
from shared.models.flux1 import FLUX1_OPTIONS, Flux1Adapter

KONTEXT_OPTIONS: dict[str, Any] = {**FLUX1_OPTIONS, "condition_size": "output"}


@MODELS.register("flux1-kontext")
class Flux1KontextAdapter(ImageConditioned, Flux1Adapter):
    model_type = "flux1-kontext"
    pipeline_class = "FluxKontextPipeline"
    option_defaults = KONTEXT_OPTIONS
    hub_examples = "black-forest-labs/FLUX.1-Kontext-dev"
    condition_images = (1, 1)

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        cls.check_condition_size(options)

    def condition_hw(self, image: Image.Image, resolution: tuple[int, int]) -> tuple[int, int]:
        """Pixel ``(h, w)`` the condition ``image`` is resized to (``options.condition_size``)."""
        if self.options["condition_size"] == "output":
            return tuple(resolution)  # type: ignore[return-value]
        from diffusers.pipelines.flux import pipeline_flux_kontext

        multiple_of = self.vae_scale_factor * 2
        h, w = self.pipeline.image_processor.get_default_height_width(image)
        _, w, h = min((abs(w / h - pw / ph), pw, ph) for pw, ph in pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS)
        return h // multiple_of * multiple_of, w // multiple_of * multiple_of

    @torch.no_grad()
    def encode_images(self, images: Sequence[Sequence[Image.Image]] | None, n: int,
                      resolution: tuple[int, int]) -> torch.Tensor:
        """``image_latents [n, C, h / f, w / f]`` in the transformer's dtype: each sample's one
        condition image, resized, normalized and VAE-encoded as the pipeline does."""
        rows = self.condition_rows(images, n)
        unique, index = self.distinct(rows)
        h, w = self.one_size([self.condition_hw(row[0], resolution) for row in unique])
        processor, vae = self.pipeline.image_processor, self.pipeline.vae
        pixels = processor.preprocess([processor.resize(row[0], h, w) for row in unique], h, w)  # [U, 3, h, w]
        latents = self.pipeline._encode_vae_image(pixels.to(self.device, vae.dtype), generator=None)
        return latents.to(self.transformer.dtype)[index.to(latents.device)]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, cfg: bool, negative_prompts: list[str] | None = None,
                       images: Sequence[Sequence[Image.Image]] | None = None,
                       resolution: tuple[int, int] | None = None) -> Conditioning:
        """``prompt_embeds [B, L, D_t5]``, ``pooled [B, D_clip]`` (as ``flux1``; no negatives) and
        ``image_latents [B, C, h, w]`` of each prompt's condition image at ``resolution`` ``(H, W)``."""
        if resolution is None:
            raise ValueError(f"{self.model_type}: encode_prompts needs the rollout resolution (H, W) to size "
                             f"the condition images.")
        cond = super().encode_prompts(prompts, cfg=cfg, negative_prompts=negative_prompts)
        cond.tensors["image_latents"] = self.encode_images(images, len(prompts), resolution)
        return cond

    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity ``[B, C, H, W]`` of the target tokens for spatial ``latents [B, C, H, W]`` at
        ``sigma [B]``; ``cond``: ``prompt_embeds``, ``pooled``, ``image_latents [B, C, h, w]`` and,
        with a guidance embedding, ``guidance [B]``."""
        pipe = self.pipeline
        b, c, h, w = latents.shape
        dtype, device = self.transformer.dtype, latents.device
        image = cond["image_latents"]
        hc, wc = image.shape[-2:]
        packed = pipe._pack_latents(latents.to(dtype), b, c, h, w)  # [B, HW/4, 4C]
        packed_image = pipe._pack_latents(image.to(dtype), b, c, hc, wc)  # [B, hw/4, 4C]
        target_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        image_ids = pipe._prepare_latent_image_ids(b, hc // 2, wc // 2, device, dtype)
        image_ids[..., 0] = 1  # as prepare_latents: condition tokens are "frame" 1
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
        timestep = (sigma * 1000.0).to(dtype) / 1000  # exactly what the pipeline passes
        out = transformer(
            hidden_states=torch.cat([packed, packed_image], dim=1), timestep=timestep,
            guidance=cond.get("guidance"), pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["prompt_embeds"], txt_ids=txt_ids,
            img_ids=torch.cat([target_ids, image_ids], dim=0), return_dict=False)[0]
        f = self.vae_scale_factor
        return pipe._unpack_latents(out[:, : packed.shape[1]], h * f, w * f, f)
