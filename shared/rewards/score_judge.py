"""``unifiedreward``: a vision-language judge behind an OpenAI-compatible server (SGLang, vLLM)
rates each image against its prompt on a 1-5 scale and writes ``Final Score: X``; the reward is
``X / 5``. Flow-GRPO's ``unifiedreward`` (UnifiedReward-7b-v1.5 served by SGLang). ``vlm_score`` is
the same reward with no model-specific defaults (``model`` required), for any judge that writes a
number on a scale.

Config::

    rewards:
      - reward_model: unifiedreward        # or vlm_score
        url: http://sglang:17140/v1        # the server's OpenAI API root (POST {url}/chat/completions)
        model: UnifiedReward-7b-v1.5       # the served model's name
        question: "...{prompt}..."         # what the judge is asked; {prompt}: the sample's prompt
        question_file: null                # or a text file holding it (e.g. the judge's own prompt)
        score_pattern: 'Final Score:\\s*([0-9]+(?:\\.[0-9]+)?)'   # one group: the number
        min_score: 1                       # the scale; reward = score / max_score (Flow-GRPO's X / 5)
        max_score: 5
        image_size: 512                    # images are resized to this square before sending
                                           # (Flow-GRPO's 512 x 512); null: as generated
        temperature: 0.0
        max_tokens: 1024
        # and, as vlm_judge (shared/rewards/chat.py): max_concurrent 8, cache_size 1024, timeout 60,
        # retries 3, backoff 0.5, token

Each image goes as one chat completion request: the PNG (a data URL), then the question. The
reward reads the LAST match of ``score_pattern`` in the reply (a judge that reasons first may quote
the format before answering). The built-in question is flowrl's wording of the criteria UnifiedReward
rates (alignment with the caption; overall quality) and of its answer format. A judge trained on
its authors' exact prompt is best asked with it: to score as Flow-GRPO's ``unifiedreward`` does,
put the question its ``flow_grpo/rewards.py`` sends in a file (``{prompt}`` where the caption goes)
and set ``question_file``.

Failures are never scores: a server that stays down raises
:class:`~shared.rewards.remote.RemoteRewardError` after the retries. A reply without a readable
score, or with one off the scale, warns (quoting the reply) and the sample gets NaN, an abstention
the advantage computation leaves out; Flow-GRPO scores it 0.0, which drags down the group's
mean and hands its neighbours a spurious advantage. Only readable scores are cached. Videos are
judged on their first frame.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.rewards.chat import ChatJudge, cache_key, png_data_url
from shared.rewards.remote import RemoteRewardError, encode_png

log = logging.getLogger("flowrl.reward.score_judge")

SCORE_PATTERN = r"Final Score:\s*([0-9]+(?:\.[0-9]+)?)"
UNIFIED_QUESTION = (
    "Below is a text caption and an image generated from it. Judge the image on two things together:\n"
    "1. Faithfulness to the caption: are the objects it names present, with the attributes, counts and "
    "relations it describes?\n"
    "2. Image quality: sharpness, detail, colour and overall visual appeal.\n"
    "Reply with one score from 1 (poor) to 5 (excellent) written after 'Final Score:'.\n"
    "Text Caption: [{prompt}]")


def read_score(reply: str, pattern: re.Pattern, low: float, high: float) -> float:
    """The number in the last match of ``pattern``'s first group in ``reply``, if it lies in
    ``[low, high]``; NaN when there is no match or it is off the scale."""
    matches = list(pattern.finditer(reply or ""))
    if not matches:
        return math.nan
    try:
        value = float(matches[-1].group(1))
    except (IndexError, TypeError, ValueError):
        return math.nan
    return value if low <= value <= high else math.nan


class VLMScore(ChatJudge):
    """A served judge's score of each image on a numeric scale, divided by ``max_score``."""

    required_fields = ("image", "prompt")
    label = "vlm_score"
    video = "first_frame"  # a video is judged on its first frame ("frames" asked once per frame and averaged)

    def __init__(self, *, url: str, model: str, question: str = UNIFIED_QUESTION, question_file: str | None = None,
                 score_pattern: str = SCORE_PATTERN, min_score: float = 1.0, max_score: float = 5.0,
                 image_size: int | None = 512, temperature: float = 0.0, max_tokens: int = 1024, **options) -> None:
        super().__init__(url=url, model=model, **options)
        if question_file is not None:
            try:
                question = Path(question_file).expanduser().read_text(encoding="utf-8").strip("\n")
            except OSError as e:
                raise ValueError(f"{self.label}: cannot read question_file {question_file!r} ({e}). Fix: give the path "
                                 f"of a text file holding the question, {{prompt}} where the prompt goes") from None
        if not question.strip():
            raise ValueError(f"{self.label}: the question is empty. Fix: write what the judge is asked, {{prompt}} "
                             f"where the sample's prompt goes")
        try:
            self.pattern = re.compile(score_pattern)
        except re.error as e:
            raise ValueError(f"{self.label}: score_pattern {score_pattern!r} is not a regular expression ({e})") from None
        if self.pattern.groups < 1:
            raise ValueError(f"{self.label}: score_pattern {score_pattern!r} needs a group around the number, "
                             f"e.g. {SCORE_PATTERN!r}")
        if not 0 <= min_score < max_score:
            raise ValueError(f"{self.label}: need 0 <= min_score < max_score; got {min_score}, {max_score}")
        if image_size is not None and int(image_size) < 1:
            raise ValueError(f"{self.label}: image_size must be a positive side in pixels or null; got {image_size}")
        if max_tokens < 1 or temperature < 0:
            raise ValueError(f"{self.label}: need max_tokens >= 1 and temperature >= 0; got {max_tokens}, {temperature}")
        self.question, self.min_score, self.max_score = question, float(min_score), float(max_score)
        self.image_size = None if image_size is None else int(image_size)
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = self.first_frames(images, prompts)
        if self.image_size is not None and tuple(images.shape[-2:]) != (self.image_size,) * 2:
            images = F.interpolate(images.float(), size=(self.image_size,) * 2, mode="bicubic", antialias=True,
                                   align_corners=False).clamp(0.0, 1.0)
        return self.parallel(self._judge, encode_png(images), prompts)

    def _judge(self, png: bytes, prompt: str) -> float:
        question = self.question.replace("{prompt}", prompt)  # other braces are the question's own text
        key = cache_key(png, question, str(self.temperature))
        hit = self.cached(key)
        if hit is not None:
            return hit
        answer = self.complete({
            "temperature": self.temperature, "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(png)}},
                {"type": "text", "text": question}]}]})
        try:
            choice = answer["choices"][0]
            reply = str(choice["message"]["content"] or "")
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise RemoteRewardError(f"{self.name}: the server at {self.url} answered without a message "
                                    f"({type(e).__name__}: {e}); is url an OpenAI chat completions API?") from None
        value = read_score(reply, self.pattern, self.min_score, self.max_score)
        if math.isnan(value):
            cut = " It was cut off at max_tokens: raise max_tokens." if choice.get("finish_reason") == "length" else ""
            log.warning("%s: the reply for prompt %r has no score from %g to %g matching %r: the sample abstains "
                        "(NaN).%s Check that the question asks for the score in that format. The reply: %r",
                        self.name, prompt, self.min_score, self.max_score, self.pattern.pattern, cut,
                        " ".join(reply.split())[-300:])
            return value  # not cached: a later attempt may answer
        reward = value / self.max_score
        self.remember(key, reward)
        return reward


class UnifiedReward(VLMScore):
    """UnifiedReward's 1-5 rating of alignment and quality, divided by 5 (Flow-GRPO's ``unifiedreward``)."""

    label = "unifiedreward"

    def __init__(self, *, model: str = "UnifiedReward-7b-v1.5", **options) -> None:
        super().__init__(model=model, **options)
