"""``toy_geneval``: the programmatic GenEval-style reward of the toy world (:mod:`shared.toy`).

Each image is checked against its prompt by :func:`shared.toy.verify.verify`; the reward is the
fraction of the prompt's checks that pass (``strict=True``: 1.0 if all pass, else 0.0). Only
toy-world prompts (the grammar of :mod:`shared.toy.scenes`) can be scored. Images of any size
work; the verifier scales its area and distance thresholds with the image.

Held-out accuracy (``details`` + ``summarize_details``, what evaluation reports as
``eval/toy_geneval/...``) follows GenEval's rule for the overall score:

- ``accuracy/{category}``: the fraction of that category's images that pass every check;
- ``accuracy``: GenEval's overall score, the UNWEIGHTED mean of the category accuracies (of the
  categories present in the eval), so each of the six tasks counts 1/6 whatever its number of
  prompts (the held-out split has 3 to 24 prompts per category);
- ``accuracy/per_image``: the plain mean over all images (weights categories by their size);
- ``present/{category}``: the fraction of that category's images in which every shape the prompt
  names is detected. With ``accuracy`` it separates the two ways to fail: a missing object, or
  a wrong count, colour or relation on the objects drawn (``accuracy / present`` is the
  accuracy given presence; at chance level, the model ignores that part of the prompt).
"""

from __future__ import annotations

import torch

from shared.rewards.base import REWARDS, RewardModel
from shared.rewards.builtin import _check_rgb, to_uint8_hwc
from shared.toy.scenes import CATEGORIES, PromptSpec, parse_prompt
from shared.toy.verify import Verdict, shape_quality, verify


def _parse(prompt: str) -> PromptSpec:
    try:
        return parse_prompt(prompt)
    except ValueError as e:
        raise ValueError(
            f"toy_geneval only scores toy-world prompts (shared.toy); cannot score prompt {prompt!r}: {e}"
        ) from None


@REWARDS.register("toy_geneval")
class ToyGenEval(RewardModel):
    """Toy GenEval verifier reward. Pointwise.

    Args:
        strict: score 1.0/0.0 (all checks pass or not) instead of the fraction of checks passed.
        exact_objects: add the check that the image holds exactly the named number of objects
            (:func:`shared.toy.verify.verify`); a training-reward option: the held-out accuracy
            (``details``, GenEval's rule) never uses it, so ``details`` ignores it.
        soft_shapes: a named shape no detection has earns partial credit from the detection most
            like it (:func:`shared.toy.verify.verify`); a training-reward option like
            ``exact_objects`` (``details`` ignores it; ``strict`` scores correctness only).
    """

    kind = "pointwise"

    def __init__(self, *, strict: bool = False, exact_objects: bool = False, soft_shapes: bool = False,
                 **options) -> None:
        super().__init__(**options)
        self.strict = bool(strict)
        self.exact_objects = bool(exact_objects)
        self.soft_shapes = bool(soft_shapes)
        if self.strict and self.soft_shapes:
            raise ValueError(f"{self.name}: soft_shapes gives partial credit, strict scores only full "
                             f"correctness; they cannot both apply. Fix: drop one of them.")

    def verdicts(self, images: torch.Tensor, prompts: list[str], exact_objects: bool = False,
                 soft_shapes: bool = False) -> list[Verdict]:
        """One :class:`~shared.toy.verify.Verdict` per image (``[B, 3, H, W]`` in [0, 1])."""
        _check_rgb(images, self.name)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: got {len(prompts)} prompts for {images.shape[0]} images")
        for prompt in prompts:
            _parse(prompt)  # fail early, with the reward's own message
        return [verify(array, prompt, exact_objects=exact_objects, soft_shapes=soft_shapes)
                for array, prompt in zip(to_uint8_hwc(images), prompts)]

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B]`` float32: fraction of checks passed (``strict``: 1.0/0.0 correctness)."""
        verdicts = self.verdicts(images, prompts, self.exact_objects, self.soft_shapes)
        values = [float(v.correct) if self.strict else v.score for v in verdicts]
        return torch.tensor(values, dtype=torch.float32)

    def details(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per-sample float32 ``[B]`` tensors: ``"accuracy/per_image"`` (1.0/0.0 correctness) and,
        for every category ``c`` of ``CATEGORIES``, ``"accuracy/c"``: correctness for samples of
        that category, NaN for the others (so ``nanmean`` gives the per-category accuracy), and likewise
        ``"present/c"``: every named shape detected (1.0/0.0). Always
        GenEval's checks (``exact_objects`` does not apply). The overall ``"accuracy"`` is an
        aggregate of the category means: :meth:`summarize_details`."""
        verdicts = self.verdicts(images, prompts)
        correct = torch.tensor([float(v.correct) for v in verdicts], dtype=torch.float32)
        present = torch.tensor([float(v.present) for v in verdicts], dtype=torch.float32)
        nan = torch.full_like(correct, float("nan"))
        out = {"accuracy/per_image": correct}
        for category in CATEGORIES:
            mine = torch.tensor([v.category == category for v in verdicts], dtype=torch.bool)
            out[f"accuracy/{category}"] = torch.where(mine, correct, nan)
            out[f"present/{category}"] = torch.where(mine, present, nan)
        return out

    def summarize_details(self, means: dict[str, float]) -> dict[str, float]:
        """GenEval's overall score: ``{"accuracy": unweighted mean of the accuracy/{category}
        means present}`` (empty when no category is)."""
        cats = [means[f"accuracy/{c}"] for c in CATEGORIES if f"accuracy/{c}" in means]
        return {"accuracy": sum(cats) / len(cats)} if cats else {}


@REWARDS.register("toy_shape_quality")
class ToyShapeQuality(RewardModel):
    """How cleanly each toy-world image draws its shapes (:func:`shared.toy.verify.shape_quality`:
    the mean template IoU of its detections, 0 for none or clutter). Pointwise, prompt-free: a
    dense auxiliary training reward next to ``toy_geneval``, whose checks are all-or-nothing per
    object; it says nothing about what the prompt asks, so it is never a metric of its own."""

    kind = "pointwise"

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B]`` float32 in [0, 1] for ``images`` ``[B, 3, H, W]`` in [0, 1]."""
        _check_rgb(images, self.name)
        return torch.tensor([shape_quality(array) for array in to_uint8_hwc(images)], dtype=torch.float32)
