"""What the rewards that ask a served model share: an OpenAI-compatible chat completions client
(vLLM, SGLang, any server with ``POST {url}/chat/completions``) with a bearer token, at most
``max_concurrent`` requests in flight, retries with backoff on connection errors, 429 and 5xx
(:func:`~shared.rewards.remote.post_with_retries`), and an LRU cache of answers keyed by what was
asked. ``vlm_judge`` (a Yes/No probability) and the RationalRewards judges (a parsed rubric) build
on :class:`ChatJudge`; each says what to ask and how to read the answer.

Failures are never scores: a server that stays down raises
:class:`~shared.rewards.remote.RemoteRewardError` after the retries.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ClassVar, Iterable

import httpx
import torch

from shared.rewards.base import RewardModel
from shared.rewards.remote import RemoteRewardError, post_with_retries


def png_data_url(png: bytes) -> str:
    """A PNG file as the ``data:`` URL an ``image_url`` content part carries."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def cache_key(*parts: bytes | str) -> str:
    """A digest of everything that was asked (images and text), for the answer cache."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class ChatJudge(RewardModel):
    """Base of the rewards that ask a served model through chat completions (see the module
    docstring). Subclasses set ``label`` (their registry name, used in messages) and call
    :meth:`complete`, :meth:`cached` / :meth:`remember` and :meth:`parallel`."""

    kind = "pointwise"
    label: ClassVar[str] = "judge"

    def __init__(self, *, url: str, model: str, max_concurrent: int = 8, cache_size: int = 1024,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, token: str | None = None,
                 **options) -> None:
        super().__init__(**options)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"{self.label}: url must be the server's OpenAI API root, e.g. http://vllm:8000/v1; "
                             f"got {url!r}")
        if not model:
            raise ValueError(f"{self.label}: model must name the served model (what the server's /v1/models lists)")
        if max_concurrent < 1 or cache_size < 0:
            raise ValueError(f"{self.label}: need max_concurrent >= 1 and cache_size >= 0; "
                             f"got {max_concurrent}, {cache_size}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"{self.label}: need timeout > 0, retries >= 0, backoff >= 0; "
                             f"got {timeout}, {retries}, {backoff}")
        self.url, self.model = url.rstrip("/"), model
        self.max_concurrent, self.cache_size = int(max_concurrent), int(cache_size)
        self.retries, self.backoff, self._timeout = int(retries), float(backoff), float(timeout)
        self._token = token or os.environ.get("FLOWRL_API_TOKEN") or None
        self._client: httpx.Client | None = None
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.requests = 0  # chat completions sent (cache hits send none)

    @property
    def name(self) -> str:
        return f"{self.label}({self.model})"

    def __repr__(self) -> str:  # never shows the token
        return f"{type(self).__name__}(url={self.url!r}, model={self.model!r})"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def first_frames(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """RGB images ``[B, 3, H, W]`` to judge, one per prompt (a video ``[B, F, 3, H, W]`` is
        judged on its first frame); ValueError on a count or channel mismatch."""
        from shared.rewards.builtin import _check_rgb

        if images.ndim == 5:
            images = images[:, 0]
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: got {len(prompts)} prompts for {images.shape[0]} images")
        _check_rgb(images, self.name)
        return images

    def parallel(self, ask: Callable[..., float], *columns: Iterable) -> torch.Tensor:
        """``ask(*row)`` for each row of ``columns``, at most ``max_concurrent`` at once -> ``[B]``."""
        rows = list(zip(*columns))
        if not rows:
            return torch.zeros(0)
        with ThreadPoolExecutor(max_workers=min(self.max_concurrent, len(rows))) as pool:
            return torch.tensor(list(pool.map(lambda row: ask(*row), rows)), dtype=torch.float32)

    def cached(self, key: str) -> Any | None:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        return None

    def remember(self, key: str, value: Any) -> None:
        with self._lock:
            if self.cache_size:
                self._cache[key] = value
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)

    def complete(self, body: dict) -> dict:
        """POST one chat completion request (``model`` filled in) -> the parsed JSON answer."""
        with self._lock:
            self.requests += 1
        response = post_with_retries(self._http(), f"{self.url}/chat/completions",
                                     json.dumps({"model": self.model, **body}).encode(),
                                     {"Content-Type": "application/json"}, self.retries, self.backoff,
                                     what="VLM judge", token_hint=f"the {self.label}'s 'token' or FLOWRL_API_TOKEN")
        try:
            return response.json()
        except ValueError:
            raise RemoteRewardError(f"{self.name}: the server at {self.url} answered with something that is not "
                                    f"JSON: {response.text[:200]!r}. Fix: point url at the OpenAI API root "
                                    f"(ending in /v1)") from None

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
                self._client = httpx.Client(timeout=self._timeout, headers=headers,
                                            limits=httpx.Limits(max_connections=self.max_concurrent))
            return self._client
