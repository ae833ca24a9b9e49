"""Tiny random-weight CLIP checkpoints for reward tests (no hub access).

:func:`save_tiny_clip` writes ONE folder that ``from_pretrained`` reads as all three things a
learned CLIP reward loads: the model (``config.json`` + ``model.safetensors``), the tokenizer (a
CLIP BPE trained locally by :func:`shared.toy.pipeline.build_tokenizer`) and the image processor
(``preprocessor_config.json``). So the same path serves as ``model_name_or_path`` and
``processor_name_or_path``, like ``openai/clip-vit-large-patch14`` on the hub.

Sizes are chosen to keep a forward pass in the milliseconds on a CPU: 2-layer towers of width 32,
32x32 images in 8x8 patches, 16 text positions (the toy tokenizer's ``MAX_TOKENS``).
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 32  # the processor's resize (shortest edge) and crop size


def tiny_clip_config(projection_dim: int = 16, vocab_size: int = 200, *, bos: int = 0, eos: int = 1,
                     pad: int = 1):
    """A ``CLIPConfig`` with 2-layer, width-32 text and vision towers."""
    from transformers import CLIPConfig

    common = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
    text = dict(common, vocab_size=vocab_size, max_position_embeddings=16, bos_token_id=bos,
                eos_token_id=eos, pad_token_id=pad)
    vision = dict(common, image_size=IMAGE_SIZE, patch_size=8, num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_image_processor(directory: str | Path, size=None, crop_size=None) -> None:
    """Write a CLIP ``preprocessor_config.json`` (bicubic, OpenAI CLIP mean/std) to ``directory``.

    ``size`` / ``crop_size`` default to ``{"shortest_edge": IMAGE_SIZE}`` and a square crop.
    """
    try:  # transformers 5: the PIL backend needs no torchvision
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as Processor

    processor = Processor(size=size or {"shortest_edge": IMAGE_SIZE},
                          crop_size=crop_size or {"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor.save_pretrained(str(directory))


def save_tiny_clip(directory: str | Path, *, projection_dim: int = 16, seed: int = 0) -> Path:
    """Save a random tiny ``CLIPModel`` + tokenizer + image processor in ``directory``; return it."""
    from transformers import CLIPModel

    from shared.toy.pipeline import build_tokenizer

    directory = Path(directory)
    tokenizer = build_tokenizer(directory)
    config = tiny_clip_config(projection_dim, vocab_size=len(tokenizer), bos=tokenizer.bos_token_id,
                              eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # a logit scale unlike the default exp(2.6592), so tests see it used
        model.logit_scale.fill_(3.0)
    model.save_pretrained(str(directory))
    save_image_processor(directory)
    return directory
