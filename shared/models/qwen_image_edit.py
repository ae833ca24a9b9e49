"""``qwen-image-edit-plus``: Qwen-Image-Edit-2509 / -2511 on diffusers' ``QwenImageEditPlusPipeline``.

Everything of ``qwen-image`` holds (true CFG with the per-token norm rescale, ``timestep = sigma``,
spatial latents normalized per channel, the pipeline's sigma grid of the *target* tokens), with
one or more condition images per sample, encoded as the pipeline's ``__call__`` encodes ``image``:

* prompts: Qwen2.5-VL sees the edit template with ``"Picture i: <|vision_start|><|image_pad|>
  <|vision_end|>"`` per image before the prompt, and the images themselves (resized to about
  ``CONDITION_IMAGE_SIZE`` = 384 x 384 pixels at their aspect ratio, then the processor's own
  resizing) -- ``pipeline.encode_prompt(image=..., prompt=...)``, one sample at a time as the
  pipeline runs (it takes batches of one). The negative prompt is encoded with the same images.
  flowrl stores the embeddings padded to ``max_sequence_length`` (``prompt_embeds [B, L, D]``,
  ``prompt_mask [B, L]``); the pipeline does not truncate, so a longer prompt is an error that
  names the fix;
* condition latents: each image resized (``options.condition_size: output``, the default: to the
  rollout's ``(H, W)``; ``pipeline``: to about ``VAE_IMAGE_SIZE`` = 1024 x 1024 pixels at its aspect
  ratio, as ``__call__``), ``image_processor.preprocess``'d and VAE-encoded with
  ``pipeline._encode_vae_image`` (mode, ``(z - mean) / std``); kept spatial per image as
  ``image_latents.{i} [B, C, h_i, w_i]``;
* the step (:meth:`QwenImageEditPlusAdapter.predict`, rollouts and replay alike): target and
  condition latents packed into 2x2-patch tokens, the condition tokens appended after the target's
  in image order, ``img_shapes = [(1, H/2f, W/2f), (1, h_1/2f, w_1/2f), ...]`` per sample (2511's
  ``zero_cond_t`` transformers then give the condition tokens timestep 0 themselves), and the
  target tokens' velocity (``noise_pred[:, :N]``).

Where torchvision is missing, the pipeline's ``Qwen2VLProcessor`` is built without its video part
(:mod:`shared.models.qwen_vl_processor`); with torchvision installed diffusers loads it as usual.

Options: ``max_sequence_length`` (prompt + image tokens after the template, default 1024, the
pipeline's limit), ``shift_resolution``, ``condition_size``, ``text_dtype`` / ``vae_dtype``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from shared.models.base import MODELS, Conditioning
from shared.models.edit import ImageConditioned
from shared.models.pipeline import DTYPE_OPTIONS
from shared.models.qwen_image import QwenImageAdapter
from shared.models.qwen_vl_processor import has_torchvision, load_image_only_processor

QWEN_EDIT_OPTIONS: dict[str, Any] = {"max_sequence_length": 1024, "shift_resolution": 512,
                                     "condition_size": "output", **DTYPE_OPTIONS}


def _edit_module():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    return pipeline_qwenimage_edit_plus


@MODELS.register("qwen-image-edit-plus")
class QwenImageEditPlusAdapter(ImageConditioned, QwenImageAdapter):
    model_type = "qwen-image-edit-plus"
    pipeline_class = "QwenImageEditPlusPipeline"
    option_defaults = QWEN_EDIT_OPTIONS
    hub_examples = "Qwen/Qwen-Image-Edit-2509 or Qwen/Qwen-Image-Edit-2511"
    condition_images = (1, None)

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        super().validate_options(options)
        cls.check_condition_size(options)

    @classmethod
    def preloaded_components(cls, path: str, options: dict[str, Any]) -> dict[str, Any]:
        """Without torchvision: the processor built from ``processor/`` without its video part."""
        return {} if has_torchvision() else {"processor": load_image_only_processor(path)}

    def prompt_token_limits(self) -> list:
        """None: the edit pipeline does not truncate (a prompt over ``max_sequence_length`` is an
        error in :meth:`encode_prompts`)."""
        return []

    # ------------------------------------------------------------------ condition images
    def vae_hw(self, image: Image.Image, resolution: tuple[int, int]) -> tuple[int, int]:
        """Pixel ``(h, w)`` of the VAE condition image (``options.condition_size``)."""
        if self.options["condition_size"] == "output":
            return tuple(resolution)  # type: ignore[return-value]
        module = _edit_module()
        w, h = module.calculate_dimensions(module.VAE_IMAGE_SIZE, image.width / image.height)
        return h, w

    def vl_images(self, row: list[Image.Image]) -> list[Image.Image]:
        """The images Qwen2.5-VL sees: each resized to about ``CONDITION_IMAGE_SIZE`` pixels."""
        module = _edit_module()
        out = []
        for image in row:
            w, h = module.calculate_dimensions(module.CONDITION_IMAGE_SIZE, image.width / image.height)
            out.append(self.pipeline.image_processor.resize(image, h, w))
        return out

    def _embed(self, prompt: str, vl_images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """One prompt with its images: ``prompt_embeds [1, L, D]``, ``prompt_mask [1, L]`` padded."""
        length = int(self.options["max_sequence_length"])
        embeds, _ = self.pipeline.encode_prompt(prompt=[prompt], image=vl_images, device=self.device)
        n = embeds.shape[1]
        if n > length:
            raise ValueError(
                f"{self.model_type}: a prompt with its {len(vl_images)} condition image(s) is {n} tokens after "
                f"the template, over model.options.max_sequence_length={length} (the pipeline does not "
                f"truncate). Fix: raise max_sequence_length (at most 1024) or shorten the prompt.")
        padded = embeds.new_zeros(1, length, embeds.shape[2], dtype=self.transformer.dtype)
        padded[:, :n] = embeds.to(self.transformer.dtype)
        mask = torch.zeros(1, length, dtype=torch.bool, device=embeds.device)
        mask[:, :n] = True  # one prompt: every returned token is valid
        return {"prompt_embeds": padded, "prompt_mask": mask}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, cfg: bool, negative_prompts: list[str] | None = None,
                       images: Sequence[Sequence[Image.Image]] | None = None,
                       resolution: tuple[int, int] | None = None) -> Conditioning:
        """Per sample: ``prompt_embeds [B, L, D]`` and ``prompt_mask [B, L]`` of the prompt with its
        condition images (``L = max_sequence_length``), ``image_latents.{i} [B, C, h_i, w_i]`` per
        condition image; with ``cfg`` the negatives (default ``""``) with the same images and latents."""
        if resolution is None:
            raise ValueError(f"{self.model_type}: encode_prompts needs the rollout resolution (H, W) to size "
                             f"the condition images.")
        rows = self.condition_rows(images, len(prompts))
        unique, index = self.distinct(rows)
        latents = self._condition_latents(unique, resolution)
        gathered = {k: v[index.to(v.device)] for k, v in latents.items()}
        vl = [self.vl_images(row) for row in unique]
        negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)

        def encode(texts: list[str]) -> dict[str, torch.Tensor]:
            cache: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # a group's members: encoded once
            for key in zip(texts, index.tolist()):
                if key not in cache:
                    cache[key] = self._embed(key[0], vl[key[1]])
            parts = [cache[key] for key in zip(texts, index.tolist())]
            return {k: torch.cat([p[k] for p in parts]) for k in ("prompt_embeds", "prompt_mask")} | gathered

        return Conditioning(encode(prompts), encode(negatives) if cfg else None)

    def _condition_latents(self, unique: list[list[Image.Image]], resolution: tuple[int, int]
                           ) -> dict[str, torch.Tensor]:
        """``image_latents.{i} [U, C, h_i, w_i]`` for the distinct rows, in the transformer's dtype."""
        processor, vae = self.pipeline.image_processor, self.pipeline.vae
        out = {}
        for i in range(len(unique[0])):
            h, w = self.one_size([self.vae_hw(row[i], resolution) for row in unique])
            pixels = processor.preprocess([row[i] for row in unique], h, w).unsqueeze(2)  # [U, 3, 1, h, w]
            z = self.pipeline._encode_vae_image(pixels.to(self.device, vae.dtype), generator=None)
            out[f"image_latents.{i}"] = z[:, :, 0].to(self.transformer.dtype)  # [U, C, h/f, w/f]
        return out

    # ------------------------------------------------------------------ the step
    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity ``[B, C, H, W]`` of the target tokens for spatial ``latents [B, C, H, W]`` at
        ``sigma [B]``; ``cond``: ``prompt_embeds``, ``prompt_mask``, ``image_latents.{i}``."""
        pipe = self.pipeline
        b, c, h, w = latents.shape
        dtype = self.transformer.dtype
        tokens = [pipe._pack_latents(latents.to(dtype), b, c, h, w)]  # [B, HW/4, 4C]
        shapes = [(1, h // 2, w // 2)]
        for i in range(sum(k.startswith("image_latents.") for k in cond)):
            image = cond[f"image_latents.{i}"]
            hc, wc = image.shape[-2:]
            tokens.append(pipe._pack_latents(image.to(dtype), b, c, hc, wc))
            shapes.append((1, hc // 2, wc // 2))
        length = int(cond["prompt_mask"].sum(1).max())  # drop the padding beyond the longest prompt
        mask = cond["prompt_mask"][:, :length]
        timestep = (sigma * 1000.0).to(dtype) / 1000  # exactly what the pipeline passes
        out = transformer(
            hidden_states=torch.cat(tokens, dim=1), timestep=timestep, guidance=None,
            encoder_hidden_states=cond["prompt_embeds"][:, :length],
            encoder_hidden_states_mask=None if bool(mask.all()) else mask.long(),
            img_shapes=[shapes] * b, return_dict=False)[0]
        f = self.vae_scale_factor
        return pipe._unpack_latents(out[:, : tokens[0].shape[1]], h * f, w * f, f).squeeze(2)
