"""Seeded random generators. Seeds flowrl derives (``(seed * stride + epoch) * stride + group ...``)
outgrow what ``torch.Generator.manual_seed`` takes (below 2**64) from ``train.seed`` 18283 on; they are
reduced modulo 2**64, which leaves every seed a generator took as it is."""

from __future__ import annotations

import torch


def seeded(seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """A generator on ``device`` (None: the CPU) seeded with ``seed`` modulo 2**64."""
    generator = torch.Generator() if device is None else torch.Generator(device=device)
    return generator.manual_seed(int(seed) % 2**64)
