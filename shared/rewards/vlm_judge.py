"""``vlm_judge``: a vision-language model behind an OpenAI-compatible server (vLLM, SGLang, ...)
answers a Yes/No question about each image; the reward is its probability of Yes.

Config::

    rewards:
      - reward_model: vlm_judge        # also registered as vllm_evaluate (Flow-Factory's name)
        url: http://vllm:8000/v1       # the server's OpenAI API root (POST {url}/chat/completions)
        model: Qwen/Qwen2.5-VL-7B-Instruct   # the served model's name
        question: 'Does this image show "{prompt}"? Answer Yes or No.'   # {prompt}: the sample's prompt
        yes: "Yes"                     # the two answer tokens
        no: "No"
        canonicalize: true             # count " yes", "YES", ... as Yes (probabilities summed)
        top_logprobs: 20               # how many alternatives of the answer token the server returns
        max_concurrent: 8              # requests in flight at once
        cache_size: 1024               # answers kept per (image, question); 0 = none
        timeout: 60                    # seconds per attempt
        retries: 3                     # extra attempts after the first (connection errors, 429, 5xx)
        backoff: 0.5                   # seconds before the first retry, doubling
        token: null                    # bearer token (the server's API key); default FLOWRL_API_TOKEN

Each image goes as one chat completion request (the PNG of the uint8-quantized image as a data URL,
then the question), ``max_tokens: 1``, ``temperature: 0``, ``logprobs: true``. From the first
token's ``top_logprobs`` the reward is ``sigmoid(log p(Yes) - log p(No))``, i.e. ``p(Yes) / (p(Yes) +
p(No))`` (Flow-Factory's ``vllm_evaluate`` rule). When only one of the two is among the returned
alternatives, the other's log-probability is taken as the lowest one returned (it can be no higher).

Failures are never scores: an unreachable or failing server is retried, then raises
:class:`~shared.rewards.remote.RemoteRewardError` (Flow-Factory's judge returns 0.0 there, which
biases advantages); a judge that answers neither Yes nor No for a sample gives that sample NaN, an
abstention the advantage computation leaves out, with a warning naming the prompt and the answer.
"""

from __future__ import annotations

import logging
import math

import torch

from shared.rewards.builtin import _check_rgb
from shared.rewards.chat import ChatJudge, cache_key, png_data_url
from shared.rewards.remote import RemoteRewardError, encode_png

log = logging.getLogger("flowrl.reward.vlm_judge")

DEFAULT_QUESTION = 'Does this image show "{prompt}"? Answer Yes or No.'


def yes_probability(top_logprobs: list[dict], yes: str = "Yes", no: str = "No",
                    canonicalize: bool = True) -> float:
    """``p(Yes) / (p(Yes) + p(No))`` from one token's alternatives ``[{"token", "logprob"}, ...]``
    (OpenAI's ``top_logprobs`` of the first completion token), NaN when neither answer is among them.

    ``canonicalize``: tokens equal to ``yes`` / ``no`` after stripping spaces and lowercasing all
    count (their probabilities summed); otherwise only exact matches. An answer missing from the
    list gets the lowest listed log-probability (an upper bound for it)."""
    def matches(token: str, word: str) -> bool:
        return token.strip().lower() == word.strip().lower() if canonicalize else token == word

    listed = [float(alt["logprob"]) for alt in top_logprobs]
    if not listed:
        return math.nan
    floor = min(listed)

    def log_p(word: str) -> float | None:
        found = [float(alt["logprob"]) for alt in top_logprobs if matches(str(alt["token"]), word)]
        return torch.logsumexp(torch.tensor(found, dtype=torch.float64), 0).item() if found else None

    lp_yes, lp_no = log_p(yes), log_p(no)
    if lp_yes is None and lp_no is None:
        return math.nan
    lp_yes = floor if lp_yes is None else lp_yes
    lp_no = floor if lp_no is None else lp_no
    return 1.0 / (1.0 + math.exp(lp_no - lp_yes))


class VLMJudge(ChatJudge):
    """The probability a served vision-language model answers Yes to ``question`` about an image."""

    required_fields = ("image", "prompt")
    label = "vlm_judge"

    def __init__(self, *, url: str, model: str, question: str = DEFAULT_QUESTION, yes: str = "Yes", no: str = "No",
                 canonicalize: bool = True, top_logprobs: int = 20, **options) -> None:
        super().__init__(url=url, model=model, **options)
        try:
            question.format(prompt="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"vlm_judge: question may use only {{prompt}} as a placeholder; {question!r} fails: {e}") from None
        if not 1 <= top_logprobs <= 20:
            raise ValueError(f"vlm_judge: need 1 <= top_logprobs <= 20 (the OpenAI API's limit), got {top_logprobs}")
        self.question, self.yes, self.no, self.canonicalize = question, yes, no, bool(canonicalize)
        self.top_logprobs = int(top_logprobs)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: got {len(prompts)} prompts for {images.shape[0]} images")
        _check_rgb(images, self.name)
        questions = [self.question.format(prompt=p) for p in prompts]
        return self.parallel(self._judge, encode_png(images), questions, prompts)

    # --- one image ---------------------------------------------------------------------------------

    def _judge(self, png: bytes, question: str, prompt: str) -> float:
        key = cache_key(png, question)
        hit = self.cached(key)
        if hit is not None:
            return hit
        answer = self.complete({
            "max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(png)}},
                {"type": "text", "text": question}]}]})
        try:
            choice = answer["choices"][0]
            alternatives = choice["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError) as e:
            raise RemoteRewardError(
                f"{self.name}: the server at {self.url} answered without the answer token's log-probabilities "
                f"({type(e).__name__}: {e}). Fix: serve a model and server that return logprobs (vLLM: "
                f"--max-logprobs >= {self.top_logprobs})") from None
        p = yes_probability(alternatives, self.yes, self.no, self.canonicalize)
        if math.isnan(p):
            reply = (choice.get("message") or {}).get("content")
            log.warning("%s: the judge answered %r (alternatives %s) for prompt %r, neither %r nor %r: "
                        "no score for this sample (NaN, it abstains)", self.name, reply,
                        [a.get("token") for a in alternatives][:5], prompt, self.yes, self.no)
            return p  # not cached: a later attempt may answer
        self.remember(key, p)
        return p
