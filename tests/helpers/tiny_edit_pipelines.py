"""Tiny random-weight image-conditioned (edit) pipelines and their condition images, offline.

* ``flux1-kontext``: ``FluxKontextPipeline`` on ``flux1``'s tiny parts (CLIP + T5, a
  ``FluxTransformer2DModel`` with a guidance embedding, FLUX.1's VAE factors and scheduler config);
* ``qwen-image-edit-plus``: ``QwenImageEditPlusPipeline`` -- the Qwen BPE trained with the edit
  template too (its system prefix tokenizes to exactly ``prompt_template_encode_start_idx = 64``
  tokens, as with the real tokenizer), the tiny ``Qwen2_5_VLForConditionalGeneration`` (its vision
  tower sees the condition images), a ``Qwen2VLProcessor`` whose PIL image processor keeps images
  to at most 112 x 112 pixels (16 vision tokens), a ``QwenImageTransformer2DModel`` with
  ``zero_cond_t`` (Qwen-Image-Edit-2511's per-token timestep: 0 for condition tokens), Qwen-Image's
  VAE normalization and scheduler config. Without torchvision the processor is built without its
  video part (:mod:`shared.models.qwen_vl_processor`).

:func:`condition_image` makes deterministic RGB test images (smooth colour fields plus noise, so
different seeds encode to different latents).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

#: (height, width) of test condition images: not the rollout resolution, so resizing is exercised
CONDITION_HW = (40, 56)
#: QwenImageEditPlusPipeline's prompt template (its system prefix: 64 tokens with Qwen's tokenizer)
QWEN_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input "
    "where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


def condition_image(seed: int, hw: tuple[int, int] = CONDITION_HW) -> Image.Image:
    """A deterministic RGB image of ``hw`` pixels."""
    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c + seed) * np.cos(4 * yy - c) for c in range(3)], axis=-1)
    pixels = 127.5 * (1 + 0.7 * base + 0.3 * rng.uniform(-1, 1, size=(h, w, 3)))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def condition_rows(batch: int, count: int, seed: int = 0) -> list[list[Image.Image]]:
    """``batch`` rows of ``count`` distinct condition images each (row ``i``: seeds ``seed + 10 i + j``)."""
    return [[condition_image(seed + 10 * i + j) for j in range(count)] for i in range(batch)]


def build_flux1_kontext(seed: int = 0):
    from diffusers import FluxKontextPipeline

    from tests.helpers.tiny_pipelines import build_flux1

    flux = build_flux1(seed)
    pipe = FluxKontextPipeline(scheduler=flux.scheduler, vae=flux.vae, text_encoder=flux.text_encoder,
                               tokenizer=flux.tokenizer, text_encoder_2=flux.text_encoder_2,
                               tokenizer_2=flux.tokenizer_2, transformer=flux.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_qwen_image_edit_plus(seed: int = 0):
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
                           QwenImageTransformer2DModel)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from shared.models.qwen_vl_processor import image_only_processor
    from tests.helpers.tiny_pipelines import QWEN_IMAGE_TEMPLATE, build_qwen_tokenizer, build_qwen_vl

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_qwen_tokenizer(Path(tmp), templates=(QWEN_IMAGE_TEMPLATE, QWEN_EDIT_TEMPLATE))
    torch.manual_seed(seed)
    text_encoder = build_qwen_vl(tok)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4), zero_cond_t=True)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True],
                                 latents_mean=[0.1, -0.2, 0.05, 0.3], latents_std=[1.5, 0.8, 1.2, 2.0])
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image(-Edit)'s scheduler_config.json
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = image_only_processor(image_processor, tok)
    pipe = QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                     processor=processor, transformer=transformer)
    assert pipe.prompt_template_encode == QWEN_EDIT_TEMPLATE, "diffusers changed the edit template"
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_edit_dataset(directory: Path, prompts: list[str], count: int) -> Path:
    """A dataset folder for edit families: ``train.jsonl`` rows ``{"prompt", "image"}`` (one image)
    or ``{"prompt", "images"}`` (several) over PNGs written to ``images/``."""
    import json

    images = Path(directory) / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, prompt in enumerate(prompts):
        names = [f"cond_{i}_{j}.png" for j in range(count)]
        for j, name in enumerate(names):
            condition_image(10 * i + j).save(images / name)
        row = {"prompt": prompt, **({"image": names[0]} if count == 1 else {"images": names})}
        lines.append(json.dumps(row))
    (Path(directory) / "train.jsonl").write_text("\n".join(lines) + "\n")
    return Path(directory)
