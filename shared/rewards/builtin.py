"""Weight-free built-in rewards (no downloads; useful for toy runs and tests).

All take images ``[B, 3, H, W]`` float in ``[0, 1]``.

* ``jpeg_incompressibility`` (DDPO, ``algorithms.md`` §8): image -> uint8 -> PIL JPEG with
  ``quality=95`` into memory; reward = file size in kB (``bytes / 1000``). Detail and noise
  score high.
* ``jpeg_compressibility``: minus that (flat, blurry images score high).
* ``brightness``: mean luma ``0.299 R + 0.587 G + 0.114 B`` in ``[0, 1]``; with ``target``,
  ``-|luma - target|``.
* ``pairwise_brightness`` (pairwise example): ``P(a brighter) = sigmoid((luma_a - luma_b) / temperature)``.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from shared.images import to_uint8_hwc  # noqa: F401  (also imported from here by other rewards)
from shared.rewards.base import REWARDS, RewardModel


def _check_rgb(images: torch.Tensor, who: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{who} expects RGB images [B, 3, H, W], got shape {tuple(images.shape)}")


def luma(images: torch.Tensor) -> torch.Tensor:
    """Mean Rec. 601 luma per image: ``[B, 3, H, W]`` -> ``[B]`` float32 in [0, 1]."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=images.device)
    return torch.einsum("bchw,c->b", images.float(), weights) / (images.shape[2] * images.shape[3])


@REWARDS.register("jpeg_incompressibility")
class JpegIncompressibility(RewardModel):
    """JPEG file size in kB at ``quality`` (DDPO uses 95). Pointwise."""

    kind = "pointwise"
    required_fields = ("image",)
    sign = 1.0

    def __init__(self, *, quality: int = 95, **options) -> None:
        super().__init__(**options)
        if not 1 <= quality <= 100:
            raise ValueError(f"{type(self).__name__}: quality must be in [1, 100], got {quality}")
        self.quality = quality

    def jpeg_kb(self, images: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32 JPEG sizes in kB."""
        _check_rgb(images, self.name)
        sizes = []
        for array in to_uint8_hwc(images):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000.0)
        return torch.tensor(sizes, dtype=torch.float32)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.sign * self.jpeg_kb(images)


@REWARDS.register("jpeg_compressibility")
class JpegCompressibility(JpegIncompressibility):
    """Minus the JPEG size in kB (flow_grpo additionally divides by 500; we do not). Pointwise."""

    sign = -1.0


@REWARDS.register("brightness")
class Brightness(RewardModel):
    """Mean luma in [0, 1], or ``-|luma - target|`` when ``target`` is set. Pointwise."""

    kind = "pointwise"
    required_fields = ("image",)

    def __init__(self, *, target: float | None = None, **options) -> None:
        super().__init__(**options)
        self.target = None if target is None else float(target)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        _check_rgb(images, self.name)
        y = luma(images)
        return y if self.target is None else -(y - self.target).abs()


@REWARDS.register("pairwise_brightness")
class PairwiseBrightness(RewardModel):
    """``P(a brighter than b) = sigmoid((luma_a - luma_b) / temperature)``. Pairwise."""

    kind = "pairwise"
    required_fields = ("image",)

    def __init__(self, *, temperature: float = 0.05, **options) -> None:
        super().__init__(**options)
        if temperature <= 0:
            raise ValueError(f"{type(self).__name__}: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def compare(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        _check_rgb(images_a, self.name)
        _check_rgb(images_b, self.name)
        return torch.sigmoid((luma(images_a) - luma(images_b)) / self.temperature)


@REWARDS.register("source_similarity")
class SourceSimilarity(RewardModel):
    """How close an output stays to its condition (source) image: ``1 - mean |x - s|`` over
    pixels and channels, in ``[0, 1]`` (1 = identical), ``s`` the sample's first condition image
    resized (bilinear, antialiased) to the output's size. Weight-free; for edit models, the
    "change only what the instruction asks" term next to an instruction-following reward. Pointwise.
    """

    kind = "pointwise"
    required_fields = ("image", "condition_images")
    condition_images = True

    def score(self, images: torch.Tensor, prompts: list[str], condition_images=None) -> torch.Tensor:
        _check_rgb(images, self.name)
        if condition_images is None or len(condition_images) != images.shape[0] or not all(condition_images):
            raise ValueError(f"{self.name}: needs one or more condition images per sample (score_all passes them)")
        h, w = images.shape[-2:]
        sources = torch.stack([source_tensor(row[0], (h, w)) for row in condition_images]).to(images.device)
        return 1.0 - (images.float() - sources).abs().mean(dim=(1, 2, 3))


def source_tensor(image, size: tuple[int, int]) -> torch.Tensor:
    """An RGB PIL image as ``[3, H, W]`` float32 in ``[0, 1]`` at ``size = (H, W)`` (PIL bilinear
    resize when the size differs)."""
    import numpy as np
    from PIL import Image

    rgb = image.convert("RGB")
    if rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0

