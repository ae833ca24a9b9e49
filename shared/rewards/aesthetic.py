"""``aesthetic``: the LAION aesthetic predictor (improved-aesthetic-predictor, "v2").

reward = ``MLP(normalize(CLIP ViT-L/14 image embedding))``, about 1-10 for real checkpoints
(the AVA / LAION rating scale), unscaled, as Flow-GRPO's ``aesthetic_score`` and DDPO return it.

The MLP head is :class:`AestheticMLP`, the exact architecture of
christophschuhmann/improved-aesthetic-predictor (``Linear 768-1024-128-64-16-1`` with dropouts
0.2, 0.2, 0.1 and no activations: the original's ReLUs are commented out), so its released
weights ``sac+logos+ava1-l14-linearMSE.pth`` load unchanged. They are not on the Hugging Face Hub
under an official id: download them from
https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth
(Flow-GRPO ships the same file in ``flow_grpo/assets/``) and set ``head_path``.

The CLIP backbone is :class:`~shared.rewards.clip_rewards.ClipBackbone` (tensor preprocessing,
``no_grad``, configured dtype); its text tower is dropped after loading. The head runs in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shared.rewards.base import REWARDS
from shared.rewards.clip_rewards import CLIP_MODEL, ClipBackbone, load_torch_state, resolve_file

HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
            "sac+logos+ava1-l14-linearMSE.pth")


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head: ``[B, input_size]`` embeddings -> ``[B]`` ratings.

    ``layers`` indices (and so state-dict keys) match the original: Linear at 0, 2, 4, 6, 7;
    Dropout at 1, 3, 5.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


def _resolve_head(head_path: str, who: str) -> Path:
    """A local file, or a hub file written ``owner/repo/path/in/repo.pth`` (downloaded)."""
    return resolve_file(head_path, option="head_path", who=who,
                        fix=f"download {HEAD_URL} and set head_path to the local file (a .pth/.pt state dict or "
                            f"a .safetensors file), or give a hub file as 'owner/repo/file'.")


def load_head_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The head's state dict from ``.safetensors`` or a torch checkpoint (a plain state dict or a
    Lightning checkpoint's ``state_dict``), on the CPU. Torch files load with ``weights_only``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_torch_state(path, option="head_path", who="aesthetic")
    return state.get("state_dict", state) if isinstance(state, dict) else state


@REWARDS.register("aesthetic")
class Aesthetic(ClipBackbone):
    """LAION aesthetic score of the image (the prompt is ignored). Pointwise.

    Args:
        head_path: the MLP weights (required): a local ``.pth``/``.pt``/``.safetensors`` file, or a
            hub file as ``owner/repo/file``.
        model_name_or_path: the CLIP the head was trained on; default ``openai/clip-vit-large-patch14``.
        processor_name_or_path: default: the model's folder.
    """

    kind = "pointwise"
    required_fields = ("image",)
    default_model = CLIP_MODEL
    uses_text = False

    def __init__(self, *, head_path: str | None = None, **options) -> None:
        if not head_path:
            raise ValueError(
                f"{type(self).__name__}: head_path is required (the aesthetic MLP weights). Fix: download "
                f"{HEAD_URL} and set head_path: /path/to/sac+logos+ava1-l14-linearMSE.pth"
            )
        super().__init__(**options)
        state = load_head_state(_resolve_head(str(head_path), self.name))
        first = state.get("layers.0.weight")
        if first is None:
            raise ValueError(
                f"{self.name}: '{head_path}' has no 'layers.0.weight'; it is not an improved-aesthetic-"
                f"predictor head (keys: {sorted(state)[:6]}...). Fix: use {HEAD_URL}."
            )
        embed_dim = self.model.config.projection_dim
        if first.shape[1] != embed_dim:
            raise ValueError(
                f"{self.name}: the head expects {first.shape[1]}-d CLIP embeddings but "
                f"'{self.model_name_or_path}' produces {embed_dim}-d ones. Fix: use the CLIP the head "
                f"was trained on (ViT-L/14, 768-d: {CLIP_MODEL})."
            )
        self.head = AestheticMLP(embed_dim)
        self.head.load_state_dict(state)
        self.head = self.head.eval().requires_grad_(False).to(self.device)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.head(self.image_embeds(self.preprocess(images)))
