"""Encoded images (PNG/JPEG bytes, raw or base64) -> float tensors ``[3, H, W]`` in ``[0, 1]``.

Both protocols carry images as encoded files: raw bytes in v2's binary tensor extension,
base64 text in JSON (v2 JSON ``data`` strings and Flow-Factory's ``/compute``). A data-URI
prefix (``data:image/png;base64,``) is accepted and ignored.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
import torch
from PIL import Image

from shared.images import rgb

# magic numbers of the formats PIL decodes that make sense for rewards
MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"RIFF": "WEBP", b"BM": "BMP"}


class ImageDecodeError(ValueError):
    """An image element could not be decoded; the message names the element."""


class ImageTooLarge(ValueError):
    """An image has more pixels than the server accepts."""


def _format_of(data: bytes) -> str | None:
    return next((fmt for magic, fmt in MAGIC.items() if data.startswith(magic)), None)


def _from_base64(text: bytes | str, where: str) -> bytes:
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    text = text.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(
            f"{where} is neither an encoded image (PNG/JPEG bytes) nor base64 text of one"
        ) from None


def image_bytes(element: bytes | str, where: str) -> bytes:
    """The encoded image in ``element``: raw PNG/JPEG bytes as they are, else base64-decoded."""
    if isinstance(element, bytes) and _format_of(element):
        return element
    data = _from_base64(element, where)
    if not _format_of(data):
        raise ImageDecodeError(
            f"{where} decodes from base64 to {len(data)} bytes that are not a PNG/JPEG/WEBP/BMP file "
            f"(first bytes {data[:8]!r}); send the encoded image file, base64-encoded in JSON"
        )
    return data


def decode_image(element: bytes | str, where: str, *, max_pixels: int) -> torch.Tensor:
    """One encoded image -> ``[3, H, W]`` float32 in ``[0, 1]`` (converted to RGB).

    Args:
        element: raw encoded bytes, or base64 text of them.
        where: how error messages name the element, e.g. ``"input 'image' element 3"``.
        max_pixels: refuse images larger than this (decompression bombs) with :class:`ImageTooLarge`.
    """
    array = decode_rgb(element, where, max_pixels=max_pixels)
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255.0).contiguous()


def decode_pil(element: bytes | str, where: str, *, max_pixels: int) -> Image.Image:
    """One encoded image -> an RGB PIL image (condition images), checked as :func:`decode_image`."""
    return Image.fromarray(decode_rgb(element, where, max_pixels=max_pixels))


def decode_rgb(element: bytes | str, where: str, *, max_pixels: int) -> np.ndarray:
    """One encoded image -> ``[H, W, 3]`` uint8 RGB (see :func:`decode_image`)."""
    data = image_bytes(element, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    raise ImageTooLarge(
                        f"{where} is {image.width}x{image.height} = {image.width * image.height} pixels; "
                        f"the server accepts at most {max_pixels} (setting max_image_pixels)"
                    )
                array = np.array(rgb(image), dtype=np.uint8)  # a writable copy; 16-bit images scaled
    except ImageTooLarge:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise ImageDecodeError(f"{where} could not be decoded as an image: {type(e).__name__}: {e}") from None
    return array
