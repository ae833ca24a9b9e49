"""Rewards used only by tests (loaded by dotted path, as a user's custom reward would be)."""

from __future__ import annotations

import torch

from shared.rewards.builtin import Brightness, luma


class BrightnessByColor(Brightness):
    """Brightness, plus ``details``: "bright" (luma > 0.5 as 1/0) and "bright/<color>" for prompts
    naming that color (NaN for the others), like toy_geneval's per-category accuracy."""

    COLORS = ("red", "blue")

    def details(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        bright = (luma(images) > 0.5).float()
        out = {"bright": bright}
        for color in self.COLORS:
            mine = torch.tensor([color in p for p in prompts])
            out[f"bright/{color}"] = torch.where(mine, bright, torch.full_like(bright, float("nan")))
        return out

    def summarize_details(self, means):
        """``bright/by_color``: the unweighted mean of the per-color means present (like
        toy_geneval's GenEval overall accuracy)."""
        colors = [means[f"bright/{c}"] for c in self.COLORS if f"bright/{c}" in means]
        return {"bright/by_color": sum(colors) / len(colors)} if colors else {}


class RecordingBrightness(Brightness):
    """Brightness that records the prompts passed to ``details`` (only evaluation asks for
    details) in ``seen`` as ``("eval", prompt)``."""

    seen: list[tuple[str, str]] = []

    def details(self, images, prompts):
        RecordingBrightness.seen.extend(("eval", p) for p in prompts)
        return {}


class PoisonError(RuntimeError):
    """What :class:`PoisonedBrightness` raises; ``retryable`` so the worker retries it (as it
    would a flaky GPU error) before dead-lettering."""

    retryable = True


class PoisonedBrightness(Brightness):
    """Brightness that always fails on a batch with a prompt containing ``poison`` (a sample
    that crashes a reward model every time it is scored)."""

    def __init__(self, *, poison: str = "triangle", **options) -> None:
        super().__init__(**options)
        self.poison = poison

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        bad = [p for p in prompts if self.poison in p]
        if bad:
            raise PoisonError(f"poisoned prompt {bad[0]!r}")
        return super().score(images, prompts)


class FrameChange(Brightness):
    """A whole-video reward (``video = "native"``): the mean absolute change between consecutive
    frames of ``[B, F, 3, H, W]`` videos (0 for a still video). Pointwise."""

    video = "native"

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim != 5:
            raise ValueError(f"FrameChange scores videos [B, F, 3, H, W], got {tuple(images.shape)}")
        return (images[:, 1:] - images[:, :-1]).abs().mean(dim=(1, 2, 3, 4))


class GroupSize(Brightness):
    """Groupwise: each sample's score is the number of images its group was scored with (a
    group split between processes scores lower, so its mean shows how groups were kept)."""

    kind = "groupwise"

    def score_group(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.full((images.shape[0],), float(images.shape[0]))


class BrightnessForRed(Brightness):
    """Brightness for prompts naming red, a constant 0.5 for the others: their prompt groups all
    score the same (zero advantage), as a verifier's all-right or all-wrong groups do."""

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        red = torch.tensor(["red" in p for p in prompts])
        return torch.where(red, super().score(images, prompts), torch.full((len(prompts),), 0.5))
