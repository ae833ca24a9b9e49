"""Image conversions shared by rewards, the blob store and the services.

Convention: images in flowrl are float tensors ``[B, 3, H, W]`` in ``[0, 1]``; on the wire and
on disk they are 8-bit (``round(x * 255)``), as PNG or as uint8 tensors ``[..., 3, H, W]``
(:meth:`shared.store.BlobStore.put_images`).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` float in [0, 1] -> ``[B, H, W, 3]`` uint8 (rounded, clamped), on the CPU."""
    u8 = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return u8.permute(0, 2, 3, 1).cpu().numpy()


def encode_png(image: torch.Tensor) -> bytes:
    """One image ``[3, H, W]`` float in [0, 1] -> PNG bytes (8-bit)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one image [3, H, W], got shape {tuple(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(to_uint8_hwc(image[None])[0]).save(buf, format="PNG")
    return buf.getvalue()


#: integer modes wider than 8 bits (16-bit grayscale PNGs open as one of them)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def rgb(image: Image.Image) -> Image.Image:
    """``image`` as a new, loaded 8-bit RGB image (its pixels outlive the file it was opened from). PIL's
    ``convert("RGB")`` clips a 16-bit grayscale image (``I;16``) to 255 instead of scaling it, so mid-gray
    came out white; those are scaled from 16 bits (``v / 257``)."""
    if image.mode in WIDE_MODES:
        gray = np.asarray(image).astype(np.float64)
        gray = np.clip(np.round(gray / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    if image.mode == "F":
        raise ValueError("a 32-bit floating-point image (PIL mode F) has no agreed range; send 8- or 16-bit images")
    return image.convert("RGB")  # (a copy for an RGB image too)


def decode_image(data: bytes) -> torch.Tensor:
    """PNG/JPEG/... bytes -> ``[3, H, W]`` float32 in [0, 1] (RGB; 16-bit images scaled, :func:`rgb`)."""
    with Image.open(io.BytesIO(data)) as im:
        array = np.asarray(rgb(im), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
