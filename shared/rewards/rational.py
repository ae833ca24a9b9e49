"""``rational_rewards_t2i`` and ``rational_rewards_edit``: a judge model (RationalRewards-8B, or any
vision-language model behind an OpenAI-compatible server such as vLLM) writes a rubric judgement of
each image; the reward is the mean of the aspect scores it gives, mapped from the rubric's 1-4 scale
onto [0, 1]. Flow-Factory's rewards of the same names, and the reward of its Qwen-Image, FLUX.1 and
edit recipes.

Config::

    rewards:
      - reward_model: rational_rewards_t2i   # or rational_rewards_edit (source image + edited image)
        url: http://localhost:8000/v1        # the server's OpenAI API root (POST {url}/chat/completions)
        model: RationalRewards-8B-T2I        # the served model's name (vLLM --served-model-name);
                                             # edit: RationalRewards-8B-Edit
        aspects: [text_faithfulness, physical_quality, text_rendering]   # which scores to average
                                             # (edit also has image_faithfulness); default all
        temperature: 0.1
        max_tokens: 2048                     # the judgement is a few hundred tokens of prose
        rubric_file: null                    # a text file replacing the built-in rubric (below)
        system_prompt: null                  # replaces the built-in system message
        sources: first                       # edit: which condition images are shown: first (as
                                             # Flow-Factory) | all (multi-image edit models)
        max_concurrent: 8                    # requests in flight at once
        cache_size: 1024                     # judgements kept per (images, request); 0 = none
        timeout: 180                         # seconds per attempt
        retries: 4                           # extra attempts after the first (connection errors, 429, 5xx)
        backoff: 1.0                         # seconds before the first retry, doubling
        token: null                          # bearer token (the server's API key); default FLOWRL_API_TOKEN

The request is a system message and one user message: the rubric, with the prompt in place of
``{prompt}`` and the images in place of its ``<image>`` markers, in order (t2i: the generated image;
edit: the source image(s), then the edited one). The judge answers in the rubric's format::

    # Detailed Judgement
    1. Text Faithfulness:
    ## Justification: ...
    ## Score: 3.5
    2. Physical and Visual Quality:
    ...
    3. Text Rendering:
    ## Score: N/A
    # Summary: ...

:func:`parse_aspect_scores` reads each aspect's section (a line naming it, optionally numbered) and
its first ``Score:`` line; :func:`rubric_reward` averages the chosen aspects' numeric scores, each
clamped to [1, 4], skipping the ``N/A`` ones, and maps the mean ``m`` to ``(m - 1) / 3``.

The built-in rubric is flowrl's own wording of the RationalRewards rubric's structure (aspects,
1-4 levels, fractional scores, the answer format above). A judge trained on a specific prompt is
best asked with that prompt: put it in a file (``{prompt}`` where the instruction goes, one
``<image>`` per image) and set ``rubric_file``.

Failures are never scores: a server that stays down raises
:class:`~shared.rewards.remote.RemoteRewardError` after the retries (Flow-Factory raises too). A
judgement with no usable score for the chosen aspects gives that sample NaN, an abstention the
advantage computation leaves out, with a warning that quotes the answer. Videos are judged on
their first frame (Flow-Factory's choice).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from shared.rewards.builtin import _check_rgb
from shared.rewards.chat import ChatJudge, cache_key, png_data_url
from shared.rewards.remote import RemoteRewardError, encode_png, encode_pil_png

log = logging.getLogger("flowrl.reward.rational")

#: aspect key -> the heading that opens its section in the judgement
HEADINGS = {
    "text_faithfulness": "Text Faithfulness",
    "image_faithfulness": "Image Faithfulness",
    "physical_quality": "Physical and Visual Quality",
    "text_rendering": "Text Rendering",
}
T2I_ASPECTS = ("text_faithfulness", "physical_quality", "text_rendering")
EDIT_ASPECTS = ("text_faithfulness", "image_faithfulness", "physical_quality", "text_rendering")
LOW, HIGH = 1.0, 4.0  # the rubric's scale

_SCORE = re.compile(r"^[\s#*>-]*score\s*\**\s*[:：]\s*\**\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"^\[?\s*([+-]?\d+(?:\.\d+)?)")
_NOT_APPLICABLE = re.compile(r"^\[?\s*n\s*/?\s*a\b", re.IGNORECASE)


def parse_aspect_scores(judgement: str, aspects: Sequence[str]) -> dict[str, float | None]:
    """The scores a judgement gives, by aspect.

    ``judgement``: the judge's answer. Only the text between a ``Detailed Judgement`` heading (when
    there is one) and ``# Summary`` (when there is one) is read. ``aspects``: every aspect of the
    rubric (keys of :data:`HEADINGS`), so that each section ends where the next one starts.

    A section opens at a line that starts (after ``#``, ``*``, ``-`` or a number like ``2.``) with
    the aspect's heading; its score is the first ``Score: <value>`` line in it that reads as a
    number or ``N/A``. Returns ``{aspect: float}`` for a number, ``{aspect: None}`` for ``N/A``
    (the aspect does not apply), and leaves out an aspect with no section or no readable score."""
    body = judgement
    start = (re.search(r"^[\s#*]*detailed\s+judge?ment", body, re.IGNORECASE | re.MULTILINE)
             or re.search(r"detailed\s+judge?ment", body, re.IGNORECASE))
    if start:
        body = body[start.end():]
    body = re.split(r"^\s*#+\s*summary", body, maxsplit=1, flags=re.IGNORECASE | re.MULTILINE)[0]
    opens = []
    for aspect in aspects:
        heading = re.compile(rf"^[\s#*>-]*(?:\d+\s*[.)]\s*)?\**\s*{re.escape(HEADINGS[aspect])}\b",
                             re.IGNORECASE | re.MULTILINE)
        found = heading.search(body)
        if found:
            opens.append((found.start(), found.end(), aspect))
    opens.sort()
    scores: dict[str, float | None] = {}
    for i, (_, end, aspect) in enumerate(opens):
        section = body[end:opens[i + 1][0] if i + 1 < len(opens) else len(body)]
        for line in _SCORE.finditer(section):
            value = line.group(1)
            number = _NUMBER.match(value)
            if number:
                scores[aspect] = float(number.group(1))
                break
            if _NOT_APPLICABLE.match(value):
                scores[aspect] = None
                break
    return scores


def rubric_reward(scores: dict[str, float | None], aspects: Sequence[str]) -> float:
    """``(m - 1) / 3`` in [0, 1], ``m`` the mean over ``aspects`` of the numeric scores in ``scores``
    (each clamped to [1, 4]; ``N/A`` and missing ones skipped); NaN when none of them has a number
    (the sample abstains)."""
    values = [min(max(float(scores[a]), LOW), HIGH) for a in aspects
              if scores.get(a) is not None and math.isfinite(float(scores[a]))]
    if not values:
        return math.nan
    return (sum(values) / len(values) - LOW) / (HIGH - LOW)


# --- the built-in rubric (flowrl's wording) -------------------------------------------------------

T2I_SYSTEM = ("You judge images made by a text-to-image model. Given the user's instruction and the "
              "generated image, score how well the image meets the instruction on a fixed rubric, "
              "explain each score, and then suggest how the instruction could be rewritten to get a "
              "better image.")
EDIT_SYSTEM = ("You judge images made by an image-editing model. Given the user's edit instruction, the "
               "source image and the edited image, score the edit on a fixed rubric, explain each score, "
               "and then suggest how the instruction could be rewritten to get a better edit.")

_LEVELS = {
    "text_faithfulness": (
        "Text Faithfulness (does the image do what the instruction asks?)",
        ["every object, attribute, count, colour, relation and action asked for is there, and nothing "
         "unrequested was added or changed",
         "nearly everything is right; a small detail is missing or slightly off",
         "several requested elements are missing, wrong or misread",
         "the instruction is largely ignored or contradicted"]),
    "image_faithfulness": (
        "Image Faithfulness (is what should stay from the source image kept?)",
        ["everything the edit should leave alone (background, identity, style, lighting) is kept or "
         "changed exactly as asked",
         "most of it is kept; a few details drift",
         "some of it carries over, but important parts of the source are lost or distorted",
         "the source image is ignored or destroyed"]),
    "physical_quality": (
        "Physical and Visual Quality (is the image plausible and clean?)",
        ["geometry, lighting, shadows and anatomy are plausible; no seams, blur, noise or other artifacts",
         "small flaws that are visible but do not spoil the image",
         "clear errors: wrong perspective, floating objects, shadows that disagree, visible seams",
         "severe errors: impossible shapes, distorted anatomy, garbled objects, heavy artifacts"]),
    "text_rendering": (
        "Text Rendering (only when the instruction asks for written text)",
        ["the text is spelled right, legible and fits the image",
         "small misspellings or inconsistent capitals",
         "large misspellings or distorted letters",
         "the text is unreadable or missing. Answer N/A when no text was asked for"]),
}


def build_rubric(aspects: Sequence[str], images: str) -> str:
    """The user message's text for the rubric over ``aspects`` (all of the judge's aspects, in
    order); ``images`` lists the images, each at an ``<image>`` marker; ``{prompt}`` marks where the
    instruction goes."""
    lines = ["Instruction: {prompt}", images, "",
             f"Judge the result on these {len(aspects)} aspects. Give each a score from 1 to 4; fractional "
             "scores such as 3.5 or 2.25 are welcome: decide the whole level first, then move it up or down "
             "for what is especially good or bad.", ""]
    for k, aspect in enumerate(aspects, 1):
        title, levels = _LEVELS[aspect]
        lines.append(f"{k}. {title}")
        lines += [f"- {4 - j}: {text}" for j, text in enumerate(levels)]
        lines.append("")
    lines += ["Then think about which weaknesses of the result the instruction could prevent, and write an "
              "improved instruction.", "",
              "Answer in exactly this format:",
              "# User Request Analysis",
              "[what the instruction asks for, including what it implies]",
              "# Detailed Judgement"]
    for k, aspect in enumerate(aspects, 1):
        na = " or N/A" if aspect == "text_rendering" else ""
        lines += [f"{k}. {HEADINGS[aspect]}:", "## Justification: [the evidence for the score]",
                  f"## Score: [a number from 1 to 4{na}]"]
    lines += ["# Summary: [one paragraph]", "", "# User Request Refinement:",
              "## Refinement Comments: [what to change in the instruction]",
              "## Refined Request: [the improved instruction]"]
    return "\n".join(lines)


def edit_rubric(sources: int) -> str:
    """The built-in edit rubric for ``sources`` source images (then the edited image)."""
    shown = (["Source image: <image>"] if sources == 1
             else [f"Source image {i}: <image>" for i in range(1, sources + 1)])
    return build_rubric(EDIT_ASPECTS, "\n".join(shown + ["Edited image: <image>"]))


T2I_RUBRIC = build_rubric(T2I_ASPECTS, "Image: <image>")
EDIT_RUBRIC = edit_rubric(1)


def user_content(rubric: str, prompt: str, image_urls: Sequence[str]) -> list[dict]:
    """The rubric as chat content parts: text, with each ``<image>`` marker replaced by the next
    image (``image_urls``, data URLs in order) and ``{prompt}`` by the prompt."""
    pieces = rubric.replace("{prompt}", prompt).split("<image>")
    if len(pieces) - 1 != len(image_urls):
        raise ValueError(f"the rubric has {len(pieces) - 1} <image> marker(s) for {len(image_urls)} image(s)")
    content: list[dict] = []
    for i, text in enumerate(pieces):
        if text:
            content.append({"type": "text", "text": text})
        if i < len(image_urls):
            content.append({"type": "image_url", "image_url": {"url": image_urls[i]}})
    return content


class RationalRewardsT2I(ChatJudge):
    """The judge's rubric scores of a generated image against its prompt, mapped onto [0, 1]."""

    required_fields = ("image", "prompt")
    video = "native"  # judged on the first frame
    label = "rational_rewards_t2i"
    ASPECTS: ClassVar[tuple[str, ...]] = T2I_ASPECTS
    RUBRIC: ClassVar[str] = T2I_RUBRIC
    SYSTEM: ClassVar[str] = T2I_SYSTEM

    def __init__(self, *, url: str, model: str = "RationalRewards-8B-T2I", aspects: Sequence[str] | None = None,
                 temperature: float = 0.1, max_tokens: int = 2048, rubric_file: str | None = None,
                 system_prompt: str | None = None, timeout: float = 180.0, retries: int = 4, backoff: float = 1.0,
                 **options) -> None:
        super().__init__(url=url, model=model, timeout=timeout, retries=retries, backoff=backoff, **options)
        if aspects is None:
            aspects = self.ASPECTS
        if isinstance(aspects, str) or not aspects or any(a not in self.ASPECTS for a in aspects):
            raise ValueError(f"{self.label}: aspects must be a non-empty list drawn from {list(self.ASPECTS)}; "
                             f"got {aspects!r}")
        if not 0 <= temperature <= 2 or max_tokens < 1:
            raise ValueError(f"{self.label}: need 0 <= temperature <= 2 and max_tokens >= 1; "
                             f"got {temperature}, {max_tokens}")
        self.aspects = tuple(aspects)
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.rubric = self.RUBRIC if rubric_file is None else self._read_rubric(rubric_file)
        self.system = self.SYSTEM if system_prompt is None else str(system_prompt)

    def images_per_request(self) -> int | None:
        """How many images each request shows (None: it varies)."""
        return 1

    def _read_rubric(self, path: str) -> str:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"{self.label}: cannot read rubric_file {path!r} ({e}). Fix: give the path of a "
                             f"text file with the judge's prompt") from None
        if "{prompt}" not in text:
            raise ValueError(f"{self.label}: rubric_file {path!r} has no {{prompt}} marker: put {{prompt}} where the "
                             f"instruction goes")
        expected, markers = self.images_per_request(), text.count("<image>")
        if expected is not None and markers != expected:
            raise ValueError(f"{self.label}: rubric_file {path!r} has {markers} <image> marker(s); each request "
                             f"shows {expected} image(s). Fix: put one <image> where each image goes")
        return text

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = self._first_frames(images, prompts)
        return self.parallel(self._judge, prompts, [[png] for png in encode_png(images)])

    def _first_frames(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim == 5:
            images = images[:, 0]
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: got {len(prompts)} prompts for {images.shape[0]} images")
        _check_rgb(images, self.name)
        return images

    # --- one sample --------------------------------------------------------------------------------

    def _judge(self, prompt: str, pngs: list[bytes], rubric: str | None = None) -> float:
        rubric = rubric or self.rubric
        key = cache_key(prompt, rubric, self.system, *pngs)
        scores, reply = self.cached(key), "(from the cache)"
        if scores is None:
            reply = self._ask(prompt, pngs, rubric)
            scores = parse_aspect_scores(reply, self.ASPECTS)
            if any(a in scores for a in self.aspects):
                self.remember(key, scores)
        reward = rubric_reward(scores, self.aspects)
        if math.isnan(reward):
            log.warning("%s: no usable score for %s in the judgement of prompt %r: no score for this sample "
                        "(NaN, it abstains). The judgement began: %r", self.name, list(self.aspects), prompt,
                        " ".join(reply.split())[:300])
        return reward

    def _ask(self, prompt: str, pngs: list[bytes], rubric: str) -> str:
        """One judgement: the judge's reply text."""
        try:
            content = user_content(rubric, prompt, [png_data_url(p) for p in pngs])
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}. Fix: the rubric needs one <image> marker per image sent") from None
        answer = self.complete({"temperature": self.temperature, "max_tokens": self.max_tokens,
                                "messages": [{"role": "system", "content": self.system},
                                             {"role": "user", "content": content}]})
        try:
            return str(answer["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as e:
            raise RemoteRewardError(f"{self.name}: the server at {self.url} answered without a message "
                                    f"({type(e).__name__}: {e}); is url an OpenAI chat completions API?") from None


class RationalRewardsEdit(RationalRewardsT2I):
    """The judge's rubric scores of an edit (source image(s) and edited image) against its
    instruction, mapped onto [0, 1]."""

    condition_images = True
    label = "rational_rewards_edit"
    ASPECTS = EDIT_ASPECTS
    RUBRIC = EDIT_RUBRIC
    SYSTEM = EDIT_SYSTEM

    def __init__(self, *, model: str = "RationalRewards-8B-Edit", sources: str = "first", **options) -> None:
        if sources not in ("first", "all"):
            raise ValueError(f"{self.label}: sources must be 'first' (the first condition image, Flow-Factory's "
                             f"choice) or 'all'; got {sources!r}")
        self.sources, self._custom_rubric = sources, options.get("rubric_file") is not None
        super().__init__(model=model, **options)

    def images_per_request(self) -> int | None:
        return 2 if self.sources == "first" else None

    def score(self, images: torch.Tensor, prompts: list[str], condition_images=None) -> torch.Tensor:
        images = self._first_frames(images, prompts)
        if condition_images is None or len(condition_images) != len(prompts) or not all(condition_images):
            raise ValueError(f"{self.name}: every sample needs its source image (condition_images); got "
                             f"{None if condition_images is None else [len(c) for c in condition_images]}")
        rows, rubrics = [], []
        for sources, edited in zip(condition_images, encode_png(images)):
            shown = sources[:1] if self.sources == "first" else sources
            rows.append([encode_pil_png(s) for s in shown] + [edited])
            rubrics.append(self.rubric if self._custom_rubric or len(shown) == 1 else edit_rubric(len(shown)))
        return self.parallel(self._judge, prompts, rows, rubrics)
