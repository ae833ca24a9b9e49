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

import base64
import collections
import hashlib
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from shared.rewards.base import RewardModel
from shared.rewards.builtin import _check_rgb
from shared.rewards.remote import RemoteRewardError, encode_png, post_with_retries

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


class VLMJudge(RewardModel):
    """The probability a served vision-language model answers Yes to ``question`` about an image."""

    kind = "pointwise"
    required_fields = ("image", "prompt")

    def __init__(self, *, url: str, model: str, question: str = DEFAULT_QUESTION, yes: str = "Yes", no: str = "No",
                 canonicalize: bool = True, top_logprobs: int = 20, max_concurrent: int = 8, cache_size: int = 1024,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, token: str | None = None,
                 **options) -> None:
        super().__init__(**options)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"vlm_judge: url must be the server's OpenAI API root, e.g. http://vllm:8000/v1; got {url!r}")
        if not model:
            raise ValueError("vlm_judge: model must name the served model (what the server's /v1/models lists)")
        try:
            question.format(prompt="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"vlm_judge: question may use only {{prompt}} as a placeholder; {question!r} fails: {e}") from None
        if not 1 <= top_logprobs <= 20 or max_concurrent < 1 or cache_size < 0:
            raise ValueError(f"vlm_judge: need 1 <= top_logprobs <= 20 (the OpenAI API's limit), max_concurrent >= 1, "
                             f"cache_size >= 0; got {top_logprobs}, {max_concurrent}, {cache_size}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"vlm_judge: need timeout > 0, retries >= 0, backoff >= 0; got {timeout}, {retries}, {backoff}")
        self.url, self.model, self.question = url.rstrip("/"), model, question
        self.yes, self.no, self.canonicalize = yes, no, bool(canonicalize)
        self.top_logprobs, self.max_concurrent, self.cache_size = int(top_logprobs), int(max_concurrent), int(cache_size)
        self.retries, self.backoff, self._timeout = int(retries), float(backoff), float(timeout)
        self._token = token or os.environ.get("FLOWRL_API_TOKEN") or None
        self._client: httpx.Client | None = None
        self._cache: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.requests = 0  # chat completions sent (cache hits send none)

    @property
    def name(self) -> str:
        return f"vlm_judge({self.model})"

    def __repr__(self) -> str:  # never shows the token
        return f"VLMJudge(url={self.url!r}, model={self.model!r})"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: got {len(prompts)} prompts for {images.shape[0]} images")
        _check_rgb(images, self.name)
        pngs = encode_png(images)
        questions = [self.question.format(prompt=p) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrent, len(pngs))) as pool:
            scores = list(pool.map(self._judge, pngs, questions, prompts))
        return torch.tensor(scores, dtype=torch.float32)

    # --- one image ---------------------------------------------------------------------------------

    def _judge(self, png: bytes, question: str, prompt: str) -> float:
        key = hashlib.sha256(png + b"\0" + question.encode()).hexdigest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        response = self._ask(png, question)
        try:
            choice = response.json()["choices"][0]
            alternatives = choice["logprobs"]["content"][0]["top_logprobs"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RemoteRewardError(
                f"{self.name}: the server at {self.url} answered without the answer token's log-probabilities "
                f"({type(e).__name__}: {e}). Fix: serve a model and server that return logprobs (vLLM: "
                f"--max-logprobs >= {self.top_logprobs})") from None
        p = yes_probability(alternatives, self.yes, self.no, self.canonicalize)
        if math.isnan(p):
            answer = (choice.get("message") or {}).get("content")
            log.warning("%s: the judge answered %r (alternatives %s) for prompt %r, neither %r nor %r: "
                        "no score for this sample (NaN, it abstains)", self.name, answer,
                        [a.get("token") for a in alternatives][:5], prompt, self.yes, self.no)
            return p  # not cached: a later attempt may answer
        with self._lock:
            if self.cache_size:
                self._cache[key] = p
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return p

    def _ask(self, png: bytes, question: str) -> httpx.Response:
        data_url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        body = {"model": self.model, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                "top_logprobs": self.top_logprobs,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "text", "text": question}]}]}
        with self._lock:
            self.requests += 1
        return post_with_retries(self._http(), f"{self.url}/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"}, self.retries, self.backoff,
                                 what="VLM judge", token_hint="the vlm_judge's 'token' or FLOWRL_API_TOKEN")

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
                self._client = httpx.Client(timeout=self._timeout, headers=headers,
                                            limits=httpx.Limits(max_connections=self.max_concurrent))
            return self._client
