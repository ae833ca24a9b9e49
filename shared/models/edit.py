"""What the image-conditioned (edit) families share: :class:`ImageConditioned`.

An edit family's ``encode_prompts`` also takes ``images`` (per sample, a list of RGB PIL images,
:func:`shared.condition_images.open_rows`) and ``resolution`` (the rollout's ``(H, W)``), and puts
the encoded condition images into the :class:`~shared.models.base.Conditioning` next to the
prompt (spatial latents ``[B, C, h, w]``, one key per condition image). Its ``predict`` appends
their tokens to the target tokens and keeps the target tokens' velocity, so rollouts and the
trainer's replay run the same step function on the same conditioning.

Conditioning tensors are stacked over the batch and concatenated over micro-batches, so the
condition latents must have one shape for every sample of an epoch: every row has the same number
of condition images, and with ``options.condition_size: output`` (the default) every condition
image is resized to the rollout resolution. ``condition_size: pipeline`` sizes them as the
pipeline's ``__call__`` does (by each image's aspect ratio), which needs images of one aspect ratio.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from PIL import Image

from shared.condition_images import condition_count_error

#: ``model.options.condition_size`` values
CONDITION_SIZES = ("output", "pipeline")


class ImageConditioned:
    """Mixin for :class:`~shared.models.pipeline.PipelineAdapter` families conditioned on images."""

    model_type: ClassVar[str]
    #: condition images per row: (min, max); max ``None`` = any number
    condition_images: ClassVar[tuple[int, int | None]] = (1, 1)

    @classmethod
    def check_condition_size(cls, options: dict) -> None:
        if options["condition_size"] not in CONDITION_SIZES:
            raise ValueError(
                f"model.options.condition_size={options['condition_size']!r} for {cls.model_type}: use "
                f"'output' (condition images resized to the rollout resolution) or 'pipeline' (sized by "
                f"aspect ratio as {cls.__name__}'s pipeline does).")

    def condition_rows(self, images: Sequence[Sequence[Image.Image]] | None, n: int) -> list[list[Image.Image]]:
        """``images`` checked for a batch of ``n`` prompts: one row per prompt, an allowed number of
        images in each, the same number in all."""
        if images is None or len(images) != n:
            got = "none" if images is None else f"{len(images)} rows"
            raise ValueError(f"{self.model_type} needs condition images for each of the {n} prompts, got "
                             f"{got}. Fix: give every dataset row \"image\" (or \"images\").")
        for row in images:
            if (error := condition_count_error(self.model_type, self.condition_images, len(row))) is not None:
                raise ValueError(error)
        counts = sorted({len(row) for row in images})
        if len(counts) > 1:
            raise ValueError(f"{self.model_type}: rows of one batch have {counts} condition images; all rows "
                             f"must have the same number (condition latents are batched). Fix: give every "
                             f"dataset row the same number of images.")
        return [list(row) for row in images]

    @staticmethod
    def distinct(rows: list[list[Image.Image]]) -> tuple[list[list[Image.Image]], torch.Tensor]:
        """The distinct rows (by image identity: a group's members share their image objects) and,
        per sample, the index of its row among them (``[B]`` long): encode once, gather per sample."""
        keys: dict[tuple[int, ...], int] = {}
        index = [keys.setdefault(tuple(id(im) for im in row), len(keys)) for row in rows]
        unique = [None] * len(keys)
        for row, i in zip(rows, index):
            unique[i] = row
        return unique, torch.tensor(index, dtype=torch.long)  # type: ignore[return-value]

    def one_size(self, sizes: list[tuple[int, int]]) -> tuple[int, int]:
        """The common ``(h, w)`` of condition images in one batch; an error naming the fix otherwise."""
        if len(set(sizes)) > 1:
            raise ValueError(
                f"{self.model_type}: with model.options.condition_size: pipeline the condition images of one "
                f"batch come out at different sizes {sorted(set(sizes))} (the pipeline keeps each image's "
                f"aspect ratio), and condition latents are batched. Fix: condition_size: output (every "
                f"condition image resized to the rollout resolution), or images of one aspect ratio.")
        return sizes[0]
