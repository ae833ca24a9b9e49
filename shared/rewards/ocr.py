"""``ocr``: does the image show the text the prompt quotes? Flow-GRPO's OCR reward.

Flow-GRPO's OCR task trains on prompts such as ``A sign that says "Open 24 hours"`` and scores an
image by reading it with PaddleOCR (``algorithms.md`` §9; Flow-Factory's ``ocr`` reward is the
same rule). Here the reader is `RapidOCR <https://github.com/RapidAI/RapidOCR>`_, PaddleOCR's
PP-OCR detection and recognition networks run by ONNX Runtime, whose wheel ships the models (no
download at run time; ``pip install 'flowrl[ocr]'``).

The rule (:func:`ocr_score`): the target is the text between the prompt's first pair of double
quotes (:func:`quoted_text`); target and recognized text (every detected line, in reading order,
joined) are lower-cased with all whitespace removed; the reward is 1 when the target occurs in the
recognized text, else ``1 - min(d, n) / n`` with ``d`` the Levenshtein distance between the two and
``n`` the target's length. A prompt that quotes nothing (or only spaces) gives NaN: the reward
abstains on it, and the advantage computation leaves it out (with one warning per prompt).

Config::

    rewards:
      - reward_model: ocr
        min_confidence: 0.0     # drop recognized lines the recognizer is less sure of than this
        engine_params: {}       # passed to rapidocr.RapidOCR(params=...), e.g. other models or
                                # {"EngineConfig.onnxruntime.use_cuda": true} with onnxruntime-gpu

The recognizer runs on the CPU unless ``engine_params`` say otherwise, as Flow-GRPO's PaddleOCR
does; ``details`` adds ``exact`` (1 when the whole target was read), the OCR accuracy of the
papers' tables.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import re
from typing import Any

import numpy as np
import torch

from shared.registry import edit_distance

from shared.images import to_uint8_hwc
from shared.rewards.base import RewardModel
from shared.rewards.builtin import _check_rgb

log = logging.getLogger("flowrl.reward.ocr")

_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')


def quoted_text(prompt: str) -> str | None:
    """The text between the first pair of double quotes of ``prompt`` (straight ``"..."`` or
    typographic ``\u201c...\u201d``), None when there is none. ``'A sign that says "Hi there"'`` ->
    ``'Hi there'``."""
    match = _QUOTED.search(prompt)
    if match is None:
        return None
    return match.group(1) if match.group(1) is not None else match.group(2)


def normalize(text: str) -> str:
    """Lower-case, every whitespace character removed (the OCR rule compares these)."""
    return re.sub(r"\s+", "", text).lower()


def ocr_score(recognized: str, target: str) -> float:
    """Flow-GRPO's OCR reward in [0, 1]: 1 when ``normalize(target)`` occurs in
    ``normalize(recognized)``, else ``1 - min(d, n) / n`` (``d``: edit distance of the two normalized
    strings, ``n``: the normalized target's length). NaN for an empty target."""
    want, got = normalize(target), normalize(recognized)
    if not want:
        return math.nan
    if want in got:
        return 1.0
    return 1.0 - min(edit_distance(got, want), len(want)) / len(want)


def _rapidocr(params: dict[str, Any]):
    try:
        from rapidocr import RapidOCR
    except ImportError as e:
        raise ImportError(
            "the 'ocr' reward reads images with RapidOCR, which is not installed. Fix: "
            "pip install 'flowrl[ocr]' (rapidocr and onnxruntime; the PP-OCR models come in the wheel)."
        ) from e
    # rapidocr logs its model paths at INFO and every empty detection at WARNING; a blank rollout
    # is an answer here, not a problem
    return RapidOCR(params={"Global.log_level": "error", **params})


class OCR(RewardModel):
    """Pointwise text-rendering reward (see the module docstring). Images ``[B, 3, H, W]`` in
    [0, 1]; returns ``[B]`` float32 in [0, 1], NaN where the prompt quotes no text."""

    kind = "pointwise"

    def __init__(self, *, min_confidence: float = 0.0, engine_params: dict[str, Any] | None = None,
                 **options) -> None:
        super().__init__(**options)
        if not 0.0 <= float(min_confidence) <= 1.0:
            raise ValueError(f"ocr: min_confidence must be in [0, 1], got {min_confidence}")
        self.min_confidence = float(min_confidence)
        self.engine = _rapidocr(engine_params or {})
        self._warned: set[str] = set()
        self._reads: collections.OrderedDict[bytes, str] = collections.OrderedDict()  # evaluation's
        # details() reads the images score() just read

    def read(self, image: np.ndarray) -> str:
        """The text the recognizer finds in one ``[H, W, 3]`` uint8 RGB image: its lines in
        reading order, joined with spaces ('' when it finds none). The last 256 reads are kept."""
        key = hashlib.blake2b(image.tobytes(), digest_size=16, person=str(image.shape).encode()[:16]).digest()
        if key in self._reads:
            return self._reads[key]
        result = self.engine(np.ascontiguousarray(image[..., ::-1]))  # RapidOCR reads arrays as BGR
        texts, scores = getattr(result, "txts", None), getattr(result, "scores", None)
        text = " ".join(t for t, s in zip(texts, scores) if s >= self.min_confidence) if texts else ""
        self._reads[key] = text
        if len(self._reads) > 256:
            self._reads.popitem(last=False)
        return text

    def _target(self, prompt: str) -> str | None:
        target = quoted_text(prompt)
        if (target is None or not normalize(target)) and prompt not in self._warned:
            self._warned.add(prompt)
            log.warning("ocr: the prompt %r quotes no text to render, so the reward abstains on it (NaN). "
                        "OCR prompts name their text in double quotes: A sign that says \"...\".", prompt)
        return target

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        _check_rgb(images, self.name)
        arrays = to_uint8_hwc(images)
        out = []
        for array, prompt in zip(arrays, prompts):
            target = self._target(prompt)
            out.append(math.nan if target is None else ocr_score(self.read(array), target))
        return torch.tensor(out, dtype=torch.float32)

    def details(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``exact``: 1.0 where the whole quoted text was read, 0.0 where not, NaN where no text is quoted."""
        scores = self.score(images, prompts)
        return {"exact": torch.where(torch.isnan(scores), scores, (scores == 1.0).float())}
