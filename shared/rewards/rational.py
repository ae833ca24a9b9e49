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
        timeout: 180                         # seconds per attempt (a judgement is long)
        retries: 4                           # Flow-Factory's 5 attempts; backoff 1.0 s, doubling
        # and, as vlm_judge (shared/rewards/chat.py): max_concurrent 8, cache_size 1024, token

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

:func:`parse_aspect_scores` reads each aspect's section (from its numbered heading to the next) and
its first ``Score:`` line, ignoring the analysis before the judgement, ``<think>`` drafts and the
summary; :func:`rubric_reward` averages the chosen aspects' numeric scores, each clamped to [1, 4],
skipping the ``N/A`` ones, and maps the mean ``m`` to ``(m - 1) / 3``.

The built-in rubric is flowrl's own wording of the RationalRewards rubric's structure (aspects,
1-4 levels, fractional scores, the answer format above). A judge trained on a specific prompt is
best asked with that prompt: put it in a file (``{prompt}`` where the instruction goes, one
``<image>`` per image) and set ``rubric_file``.

Failures are never scores: a server that stays down raises
:class:`~shared.rewards.remote.RemoteRewardError` after the retries (Flow-Factory raises too). A
judgement (empty, cut off at ``max_tokens``, or in another format) with no readable score for a
chosen aspect warns, quoting it and saying what to check; with none for any, the sample gets NaN,
an abstention the advantage computation leaves out. Only complete judgements are cached. Chosen
aspects all answered ``N/A`` (text rendering for a prompt without text) give NaN quietly. Videos
are judged on their first frame (Flow-Factory's choice).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from pathlib import Path
from typing import ClassVar, Sequence

import torch

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

_FLAGS = re.IGNORECASE | re.MULTILINE
_LEAD = r"^[ \t#*>-]*"  # markdown before a heading or a score: #, *, >, -
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.IGNORECASE | re.DOTALL)
_SUMMARY = re.compile(r"^[\s#*>]*summary\b", _FLAGS)
_JUDGEMENT = re.compile(r"^[\s#*>]*detailed\s+judge?ment\b", _FLAGS)
_SCORE = re.compile(_LEAD + r"(?:final\s+|overall\s+)?score\s*(?:\([^)\n]*\))?\s*\**\s*[:：]\s*\**\s*(.*?)\s*$",
                    _FLAGS)
_ON_HEADING = (re.compile(r"score[^:：\n]*[:：]\s*\**\s*(\S[^\n]*)", re.IGNORECASE),  # "... (Score: 3.5)"
               re.compile(r"[:：]\s*\**\s*(\S[^\n]*)"))  # "1. Text Faithfulness: 3.5"
_NUMBER = re.compile(r"^\[?\s*([+-]?\d+(?:\.\d+)?)")
_NOT_APPLICABLE = re.compile(r"^\[?\s*n\s*/?\s*a\b", re.IGNORECASE)


def _value(text: str) -> float | None | bool:
    """A score's text -> its number, None for N/A, False when it reads as neither."""
    number = _NUMBER.match(text)
    if number:
        return float(number.group(1))
    return None if _NOT_APPLICABLE.match(text) else False


def _headings(body: str, aspects: Sequence[str]) -> list[tuple[int, int, str]]:
    """``(start, end, aspect)`` of each aspect's heading line in ``body``, in document order.

    A heading is a numbered line naming the aspect (``2. Physical and Visual Quality:``, with
    markdown around it or a score after it), or, when the judgement numbers none, a line holding
    the name alone (``**Text Rendering**:``). A sentence that merely starts with an aspect's name
    is neither, so it cannot open that aspect's section early. The first heading of each aspect
    counts."""
    numbered: list[tuple[int, int, str]] = []
    bare: list[tuple[int, int, str]] = []
    for aspect in aspects:
        name = re.escape(HEADINGS[aspect])
        numbered += [(m.start(), m.end(), aspect) for m in
                     re.finditer(_LEAD + rf"\d+\s*[.)]\s*\**\s*{name}\b[^\n]*", body, _FLAGS)]
        bare += [(m.start(), m.end(), aspect) for m in
                 re.finditer(_LEAD + rf"\**\s*{name}\s*\**\s*[:：]?\s*\**[ \t]*$", body, _FLAGS)]
    first: dict[str, tuple[int, int, str]] = {}
    for heading in sorted(numbered or bare):
        first.setdefault(heading[2], heading)
    return sorted(first.values())


def parse_aspect_scores(judgement: str, aspects: Sequence[str]) -> dict[str, float | None]:
    """The scores a judgement gives, by aspect.

    ``judgement``: the judge's answer. ``<think>`` blocks are dropped, everything from a line
    starting with ``Summary`` (``# Summary:``, ``**Summary:**``) on is ignored, and when there is a
    ``Detailed Judgement`` heading line only the text after the last one is read. ``aspects``:
    every aspect of the rubric (keys of :data:`HEADINGS`), so that each section ends where the
    next one starts.

    Each aspect's section runs from its heading (see :func:`_headings`) to the next aspect's. Its
    score is the first ``Score: <value>`` line in it (``## Score:``, ``**Score:**``, ``Final
    score:``, ``Score (1-4):``) that reads as a number or ``N/A``; failing that, a value after a
    colon on the heading line itself (``1. Text Faithfulness: 3.5``). Returns ``{aspect: float}``
    for a number, ``{aspect: None}`` for ``N/A`` (the aspect does not apply), and leaves out an
    aspect with no section or no readable score."""
    body = _THINK.sub("", judgement)
    body = _SUMMARY.split(body, maxsplit=1)[0]
    starts = list(_JUDGEMENT.finditer(body))
    if starts:
        body = body[starts[-1].end():]
    opens = _headings(body, aspects)
    scores: dict[str, float | None] = {}
    for i, (start, end, aspect) in enumerate(opens):
        section = body[end:opens[i + 1][0] if i + 1 < len(opens) else len(body)]
        values = [_value(m.group(1)) for m in _SCORE.finditer(section)]
        heading_tail = re.split(re.escape(HEADINGS[aspect]), body[start:end], maxsplit=1, flags=re.IGNORECASE)[-1]
        values += [_value(m.group(1)) for m in (p.search(heading_tail) for p in _ON_HEADING) if m]
        read = [v for v in values if v is not False]
        if read:
            scores[aspect] = read[0]
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


@functools.lru_cache(maxsize=None)
def edit_rubric(sources: int) -> str:
    """The built-in edit rubric for ``sources`` source images (then the edited image)."""
    shown = (["Source image: <image>"] if sources == 1
             else [f"Source image {i}: <image>" for i in range(1, sources + 1)])
    return build_rubric(EDIT_ASPECTS, "\n".join(shown + ["Edited image: <image>"]))


T2I_RUBRIC = build_rubric(T2I_ASPECTS, "Image: <image>")
EDIT_RUBRIC = edit_rubric(1)


def user_content(rubric: str, prompt: str, image_urls: Sequence[str]) -> list[dict]:
    """The rubric as chat content parts: text, with each ``<image>`` marker replaced by the next
    image (``image_urls``, data URLs in order) and ``{prompt}`` by the prompt (which may itself
    contain ``<image>``: the rubric is split first)."""
    pieces = [piece.replace("{prompt}", prompt) for piece in rubric.split("<image>")]
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
    video = "first_frame"  # judged on the first frame, and served for images ("native" took videos only)
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
        """How many images each request shows (None: it varies, at least 2)."""
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
        markers = text.count("<image>")
        expected = self.images_per_request()
        if (markers != expected) if expected is not None else markers < 2:
            shows = f"{expected} image(s)" if expected is not None else "each source image and then the edited one"
            raise ValueError(f"{self.label}: rubric_file {path!r} has {markers} <image> marker(s); each request "
                             f"shows {shows}. Fix: put one <image> where each image goes")
        return text

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = self.first_frames(images, prompts)
        return self.parallel(self._judge, prompts, [[png] for png in encode_png(images)])

    # --- one sample --------------------------------------------------------------------------------

    def _judge(self, prompt: str, pngs: list[bytes], rubric: str | None = None) -> float:
        rubric = rubric or self.rubric
        key = cache_key(prompt, rubric, self.system, *pngs)
        scores = self.cached(key)
        if scores is not None:
            return rubric_reward(scores, self.aspects)  # cached: read in full before
        reply, truncated = self._ask(prompt, pngs, rubric)
        scores = parse_aspect_scores(reply, self.ASPECTS)
        missing = [a for a in self.aspects if a not in scores]
        if not truncated and not missing:
            self.remember(key, scores)
        reward = rubric_reward(scores, self.aspects)
        if missing:
            why = (" The reply was empty." if not reply.strip() else
                   f" The reply was cut off at max_tokens ({self.max_tokens}): raise max_tokens (and the server's "
                   f"--max-model-len)." if truncated else "")
            log.warning("%s: the judgement of prompt %r has no readable score for %s: %s.%s Check that the served "
                        "model answers in the rubric's format ('N. <Aspect>:' headings, 'Score:' lines; a "
                        "rubric_file must ask for them). The judgement began: %r", self.name, prompt, missing,
                        "the sample abstains (NaN)" if math.isnan(reward) else "the reward averages the others",
                        why, " ".join(reply.split())[:300])
        elif math.isnan(reward):  # every chosen aspect answered N/A: it does not apply to this sample
            log.debug("%s: %s all N/A for prompt %r: the sample abstains (NaN)", self.name, list(self.aspects), prompt)
        return reward

    def _ask(self, prompt: str, pngs: list[bytes], rubric: str) -> tuple[str, bool]:
        """One judgement: the judge's reply text, and whether it was cut off at ``max_tokens``."""
        try:
            content = user_content(rubric, prompt, [png_data_url(p) for p in pngs])
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}. Fix: the rubric_file needs one <image> marker per image sent") from None
        answer = self.complete({"temperature": self.temperature, "max_tokens": self.max_tokens,
                                "messages": [{"role": "system", "content": self.system},
                                             {"role": "user", "content": content}]})
        try:
            choice = answer["choices"][0]
            return str(choice["message"]["content"] or ""), choice.get("finish_reason") == "length"
        except (KeyError, IndexError, TypeError, AttributeError) as e:
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
        images = self.first_frames(images, prompts)
        if condition_images is None or len(condition_images) != len(prompts) or not all(condition_images):
            raise ValueError(f"{self.name}: every sample needs its source image (condition_images); got "
                             f"{None if condition_images is None else [len(c) for c in condition_images]} per "
                             f"sample. Fix: train an edit model (flux1-kontext, qwen-image-edit-plus) on rows with "
                             f"an `image`, or judge text-to-image samples with rational_rewards_t2i")
        rows, rubrics = [], []
        for sources, edited in zip(condition_images, encode_png(images)):
            shown = sources[:1] if self.sources == "first" else sources
            rows.append([encode_pil_png(s) for s in shown] + [edited])
            rubrics.append(self.rubric if self._custom_rubric or len(shown) == 1 else edit_rubric(len(shown)))
        return self.parallel(self._judge, prompts, rows, rubrics)
