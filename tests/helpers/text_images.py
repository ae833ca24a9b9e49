"""Images of rendered text for the ``ocr`` reward's tests (Pillow's own scalable font; no files)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def render_text(text: str, size: int = 192, seed: int = 0) -> torch.Tensor:
    """``[3, size, size]`` float in [0, 1]: dark ``text`` on a light, slightly tinted background,
    roughly centred, one line whose height is a fifth of the image (blank for ``text=""``)."""
    rng = np.random.default_rng(seed)
    background = tuple(int(v) for v in rng.integers(215, 250, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(8, size // 5))
    while text and draw.textlength(text, font=font) > 0.9 * size and font.size > 8:
        font = ImageFont.load_default(size=font.size - 2)
    if text:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), text,
                  fill=(20, 20, 30), font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
