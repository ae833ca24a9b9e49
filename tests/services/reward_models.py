"""Rewards used only by the reward-server tests, loaded by dotted path like a user's plugin."""

from __future__ import annotations

import threading
import time

import torch

from shared.rewards.builtin import Brightness


class SlowLoading(Brightness):
    """Brightness whose construction waits on ``gate`` (an Event set by the test) or ``seconds``."""

    gate = threading.Event()

    def __init__(self, *, seconds: float = 10.0, **options) -> None:
        super().__init__(**options)
        SlowLoading.gate.wait(timeout=seconds)


class FailsToLoad(Brightness):
    def __init__(self, **options) -> None:
        super().__init__(**options)
        raise RuntimeError("weights file not found: /models/missing.safetensors")


class BadAt(Brightness):
    """Brightness, except the sample whose prompt is ``"nan"`` / ``"inf"`` gets that value."""

    def score(self, images, prompts):
        out = super().score(images, prompts)
        for i, p in enumerate(prompts):
            if p in ("nan", "inf"):
                out[i] = float(p)
        return out


class Crashes(Brightness):
    def score(self, images, prompts):
        raise RuntimeError("CUDA error: device-side assert triggered")


class CountingBrightness(Brightness):
    """Brightness that records the batch size of each ``score`` call and takes ``delay`` s per call."""

    calls: list[int] = []

    def __init__(self, *, delay: float = 0.0, **options) -> None:
        super().__init__(**options)
        self.delay = delay

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        CountingBrightness.calls.append(images.shape[0])
        time.sleep(self.delay)
        return super().score(images, prompts)
