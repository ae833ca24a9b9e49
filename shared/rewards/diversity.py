"""``diversity``: how different each image is from the other images of its prompt group, in the
feature space of a frozen vision model. Groupwise.

Each sample's score is its mean cosine distance ``1 - cos(f_i, f_j)`` to the other members
(``reduce: min``: to its nearest one, GARDO's choice for its diversity-aware advantages), so the
mean over a group is the group's average pairwise distance. As an evaluation reward it measures
mode collapse (with ``eval.images_per_prompt`` > 1: evaluation keeps a prompt's images together);
in ``rewards`` with a small weight it pays for variety. A group of one image has nothing to
differ from: NaN (it abstains).

Features: ``model_name_or_path`` is any ``transformers`` vision model: DINOv2 (default
``facebook/dinov2-base``, the usual choice for measuring image diversity) or another ViT-style
``AutoModel`` gives its pooled output (else its first token), a CLIP model its projected image
embedding. Images are preprocessed as tensors from the model's ``preprocessor_config.json``
(resize, crop, mean and std; :class:`~shared.rewards.clip_rewards.ClipImageTransform`).

Options: ``model_name_or_path``, ``processor_name_or_path`` (default: the model's folder),
``reduce`` (``mean`` | ``min``), ``chunk_size`` (images per forward pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.rewards.base import RewardModel
from shared.rewards.clip_rewards import ClipImageTransform, _features, load_pretrained

DINOV2 = "facebook/dinov2-base"
REDUCTIONS = ("mean", "min")


def group_distances(features: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Per member of one group, its cosine distance to the others.

    Args:
        features: ``[K, D]`` feature vectors (any scale: they are L2-normalized here).
        reduce: ``"mean"`` over the other ``K - 1`` members, or ``"min"`` (the nearest one).

    Returns:
        ``[K]`` float32 in ``[0, 2]``; all NaN when ``K < 2``.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}; got {reduce!r}")
    k = features.shape[0]
    if k < 2:
        return torch.full((k,), float("nan"))
    f = F.normalize(features.float(), dim=-1)
    distance = (1.0 - f @ f.T).clamp(0.0, 2.0)
    others = ~torch.eye(k, dtype=torch.bool, device=f.device)
    if reduce == "mean":
        return ((distance * others).sum(dim=1) / (k - 1)).cpu()
    return distance.masked_fill(~others, float("inf")).min(dim=1).values.cpu()


class Diversity(RewardModel):
    """Each image's cosine distance to the other images of its group (module docstring)."""

    kind = "groupwise"
    required_fields = ("image",)

    def __init__(self, *, model_name_or_path: str = DINOV2, processor_name_or_path: str | None = None,
                 reduce: str = "mean", chunk_size: int = 32, **options) -> None:
        super().__init__(**options)
        if reduce not in REDUCTIONS:
            raise ValueError(f"diversity: reduce must be one of {', '.join(REDUCTIONS)}; got {reduce!r}")
        if chunk_size < 1:
            raise ValueError(f"diversity: chunk_size must be >= 1, got {chunk_size}")
        from transformers import AutoConfig, AutoModel, CLIPModel

        self.reduce, self.chunk_size = reduce, int(chunk_size)
        config = load_pretrained(AutoConfig.from_pretrained, model_name_or_path, option="model_name_or_path",
                                 who="diversity")
        self.clip = config.model_type == "clip"
        loader = CLIPModel.from_pretrained if self.clip else AutoModel.from_pretrained
        model = load_pretrained(loader, model_name_or_path, option="model_name_or_path", who="diversity")
        if self.clip:
            model.text_model = model.text_projection = None  # only the image tower is used
        self.model = model.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)
        self.transform = load_pretrained(ClipImageTransform.from_pretrained,
                                         processor_name_or_path or model_name_or_path,
                                         option="processor_name_or_path", who="diversity")

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, D]`` float32 features, ``chunk_size`` at a time."""
        out = []
        for s in range(0, images.shape[0], self.chunk_size):
            pixels = self.transform(images[s:s + self.chunk_size].to(self.device)).to(self.dtype)
            if self.clip:
                out.append(_features(self.model.get_image_features(pixel_values=pixels)).float())
                continue
            result = self.model(pixel_values=pixels)
            pooled = getattr(result, "pooler_output", None)
            out.append((pooled if pooled is not None else result.last_hidden_state[:, 0]).float())
        return torch.cat(out)

    def score_group(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return group_distances(self.features(images), self.reduce)
