"""Server-side dynamic batching: merge queued requests for one model into one scoring call.

Requests queue per model. A batch closes when it holds ``max_batch_size`` samples or when the
oldest request has waited ``max_queue_delay_ms`` (Triton's semantics); a request is never
split, so a request larger than ``max_batch_size`` forms a batch of its own. The merged batch
is scored in a single worker thread per model (the event loop stays responsive and a model
is never called concurrently), and the scores are split back to the requests.

Failure isolation: when a merged batch fails, each request is scored on its own, so one bad
request (e.g. a prompt the reward rejects) fails alone. NaN/inf scores fail the request with
a message naming the reward and the sample index.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from services.reward.errors import RequestError
from services.reward.metrics import Metrics
from shared.rewards import RewardModel, RewardOutputError, score_all

log = logging.getLogger("flowrl.reward")


@dataclass
class Work:
    """One request's samples waiting to be scored."""

    images: list[torch.Tensor]  # each [3, H, W] (videos: [F, 3, H, W]) in [0, 1]
    prompts: list[str]
    group_ids: list[int] | None  # None = the request is one group (groupwise/pairwise)
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    conditions: list[list[Any]] | None = None  # per sample its condition images (RGB PIL), if sent
    metadata: list[dict] | None = None  # per sample its dataset row metadata, if sent (to a reward that reads it)
    abstain: bool = False  # the protocol carries NaN (v2: JSON null or FP32 NaN), the reward contract's abstention

    @property
    def n(self) -> int:
        return len(self.prompts)


def score_requests(model: RewardModel, works: list[Work], batch_size: int) -> list[torch.Tensor]:
    """Score several requests in one go; one ``[n_i]`` float32 tensor per request.

    Images of different sizes are scored in separate :func:`score_all` calls (one tensor per
    size); group ids are made unique per request, so requests never share a group.
    """
    images = [im for w in works for im in w.images]
    prompts = [p for w in works for p in w.prompts]
    keys: dict[tuple[int, int], int] = {}
    ids = [keys.setdefault((i, g), len(keys)) for i, w in enumerate(works) for g in (w.group_ids or [0] * w.n)]
    group_ids = torch.tensor(ids, dtype=torch.int64)
    buckets: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        buckets.setdefault(tuple(im.shape), []).append(i)
    conditions = ([c for w in works for c in (w.conditions or [[]] * w.n)]
                  if any(w.conditions for w in works) else None)
    metadata = ([m for w in works for m in (w.metadata or [{}] * w.n)]
                if any(w.metadata for w in works) else None)
    out = torch.empty(len(images), dtype=torch.float32)
    for members in buckets.values():
        idx = torch.tensor(members)
        batch = torch.stack([images[i] for i in members])
        out[idx] = score_all(model, batch, [prompts[i] for i in members], group_ids[idx], batch_size,
                             None if conditions is None else [conditions[i] for i in members],
                             None if metadata is None else [metadata[i] for i in members])
    return list(out.split([w.n for w in works]))


def _size(shape: tuple[int, ...]) -> str:
    """``HxW`` of an image shape ``[3, H, W]`` (videos ``[F, 3, H, W]``: ``HxW x F frames``)."""
    return f"{shape[-2]}x{shape[-1]}" + (f" x {shape[0]} frames" if len(shape) == 4 else "")


def _first_bad_sample(model: RewardModel, work: Work, batch_size: int, limit: int = 256) -> int | None:
    """Index of the first sample whose score alone is invalid (pointwise models only)."""
    if model.kind != "pointwise" or work.n > limit:
        return None
    for i in range(work.n):
        single = Work([work.images[i]], [work.prompts[i]], None, work.future,
                      conditions=None if work.conditions is None else [work.conditions[i]],
                      metadata=None if work.metadata is None else [work.metadata[i]])
        try:
            score = score_requests(model, [single], batch_size)[0]
        except RewardOutputError:
            return i
        if not bool(torch.isfinite(score).all()):
            return i
    return None


def failure(name: str, model: RewardModel, work: Work, error: Exception, batch_size: int) -> RequestError:
    """A scoring exception as a teaching :class:`RequestError`."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, RewardOutputError):
        bad = _first_bad_sample(model, work, batch_size)
        where = f" (sample {bad} of this request)" if bad is not None else ""
        return RequestError(500, f"reward '{name}' produced an invalid score{where}: {error}")
    if isinstance(error, (ValueError, TypeError)):
        return RequestError(422, f"reward '{name}' rejected the inputs: {error}")
    log.exception("reward '%s' failed", name, exc_info=error)
    return RequestError(500, f"reward '{name}' failed: {type(error).__name__}: {error}")


def check_finite(name: str, work: Work, scores: torch.Tensor) -> RequestError | None:
    """An error naming the first inf score (and NaN, unless the request's protocol carries the reward
    contract's abstention, ``work.abstain``), or None."""
    wrong = torch.isinf(scores) if work.abstain else ~torch.isfinite(scores)
    bad = torch.nonzero(wrong).flatten()
    if bad.numel() == 0:
        return None
    i = int(bad[0])
    hint = " (a pairwise/groupwise reward gives NaN to a group of one)" if math.isnan(float(scores[i])) else ""
    return RequestError(
        500,
        f"reward '{name}' returned {float(scores[i])} for sample {i} of this request (prompt {work.prompts[i]!r})"
        f"{hint}; scores served over HTTP must be finite" + ("" if work.abstain else " (NaN, the abstention, "
                                                          "travels over the v2 protocol only)"),
    )


class DynamicBatcher:
    """Queue, merge and score requests for one model (see the module docstring).

    Args:
        name: the served model name (metric label, error messages).
        model: the reward model.
        batch_size: images (pointwise) or pairs (pairwise) per model call inside a batch.
        max_batch_size: samples merged into one batch at most.
        max_queue_delay_ms: how long the oldest queued request waits for company.
        max_queue_size: queued samples beyond which new requests get 503.
        metrics: where batch size, queue time and model time are recorded.
    """

    def __init__(self, name: str, model: RewardModel, *, batch_size: int, max_batch_size: int,
                 max_queue_delay_ms: float, max_queue_size: int, metrics: Metrics) -> None:
        self.name, self.model, self.batch_size = name, model, batch_size
        self.max_batch_size, self.max_queue_size = max_batch_size, max_queue_size
        self.delay = max_queue_delay_ms / 1000.0
        self.metrics = metrics
        self._pending: list[Work] = []
        self._queued = 0
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reward-{name}")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop batching; queued requests fail with 503."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for work in self._pending:
            if not work.future.done():
                work.future.set_exception(RequestError(503, f"reward '{self.name}': the server is shutting down"))
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, images: list[torch.Tensor], prompts: list[str], group_ids: list[int] | None,
                     conditions: list[list[Any]] | None = None,
                     metadata: list[dict] | None = None, abstain: bool = False) -> torch.Tensor:
        """Queue one request and wait for its ``[n]`` float32 scores. ``conditions``: per sample
        its condition images (RGB PIL), required by a reward that reads them and refused by others.
        ``metadata``: per sample its dataset row metadata, for a reward that reads it (dropped for
        others: Flow-Factory's client sends it to every reward).

        Raises:
            RequestError: 503 when the queue is full, 422 for inputs the model cannot take,
                500 when the model fails or returns NaN/inf.
        """
        n = len(prompts)
        if self.model.condition_images and not (conditions and all(conditions)):
            raise RequestError(422, f"reward '{self.name}' compares each image with its condition (source) images: "
                                    f"send them (v2 input 'condition_images' BYTES [B, M]; /compute "
                                    f"'condition_images': [[base64 PNG, ...], ...]), at least one per sample")
        if conditions is not None and not self.model.condition_images:
            raise RequestError(422, f"reward '{self.name}' does not read condition images; do not send them")
        if self._queued and self._queued + n > self.max_queue_size:
            raise RequestError(
                503, f"reward '{self.name}': queue full ({self._queued} samples waiting, max_queue_size "
                     f"{self.max_queue_size}); retry later", {"Retry-After": "1"})
        if self.model.kind != "pointwise":
            self._check_group_sizes(images, group_ids)
        if metadata is not None and len(metadata) != n:
            raise RequestError(422, f"got metadata for {len(metadata)} samples and {n} prompts; they must align")
        work = Work(images, prompts, group_ids, asyncio.get_running_loop().create_future(), conditions=conditions,
                    metadata=metadata if self.model.metadata else None, abstain=abstain)
        self._pending.append(work)
        self._queued += n
        self.metrics.queue_samples.labels(self.name).set(self._queued)
        self._wake.set()
        return await work.future

    def _check_group_sizes(self, images: list[torch.Tensor], group_ids: list[int] | None) -> None:
        sizes: dict[int, tuple[int, ...]] = {}
        members: dict[int, int] = {}
        for i, (im, g) in enumerate(zip(images, group_ids or [0] * len(images))):
            members[g] = members.get(g, 0) + 1
            if sizes.setdefault(g, tuple(im.shape)) != tuple(im.shape):
                raise RequestError(
                    422, f"group {g} mixes image sizes {_size(sizes[g])} and {_size(tuple(im.shape))} "
                         f"(element {i}); a {self.model.kind} reward compares a group's images together, so they "
                         f"must have one size")
        lonely = [g for g, n in members.items() if n < 2]
        if self.model.kind == "pairwise" and lonely:
            raise RequestError(
                422, f"group {lonely[0]} has one member; a pairwise reward scores a sample by comparing it with the "
                     f"other members of its group, so send at least two per group (all of a group in one request)")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = self._pending[0].enqueued + self.delay
            while self._queued < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            try:
                await self._score(loop, batch)
            except Exception as e:  # never let the loop die: fail the batch instead
                log.exception("batcher for '%s' failed", self.name)
                for work in batch:
                    if not work.future.done():
                        work.future.set_exception(RequestError(500, f"reward '{self.name}' failed: {e}"))

    def _take(self) -> list[Work]:
        batch, total = [], 0
        while self._pending and (not batch or total + self._pending[0].n <= self.max_batch_size):
            work = self._pending.pop(0)
            batch.append(work)
            total += work.n
        self._queued -= total
        self.metrics.queue_samples.labels(self.name).set(self._queued)
        return batch

    async def _score(self, loop: asyncio.AbstractEventLoop, batch: list[Work]) -> None:
        works = [w for w in batch if not w.future.done()]  # skip requests whose client left
        if not works:
            return
        now = time.monotonic()
        for w in works:
            self.metrics.queue_seconds.labels(self.name).observe(now - w.enqueued)
        self.metrics.batch_size.labels(self.name).observe(sum(w.n for w in works))
        self.metrics.batch_requests.labels(self.name).observe(len(works))
        start = time.perf_counter()
        try:
            results: list[torch.Tensor | RequestError] = list(
                await loop.run_in_executor(self._executor, score_requests, self.model, works, self.batch_size))
        except Exception as e:
            results = [await self._score_alone(loop, w, e if len(works) == 1 else None) for w in works]
        self.metrics.model_seconds.labels(self.name).observe(time.perf_counter() - start)
        for work, result in zip(works, results):
            if isinstance(result, torch.Tensor):
                error = check_finite(self.name, work, result)
                if error is None:
                    self.metrics.samples.labels(self.name).inc(work.n)
                result = error or result
            if not work.future.done():
                if isinstance(result, RequestError):
                    work.future.set_exception(result)
                else:
                    work.future.set_result(result)

    async def _score_alone(self, loop, work: Work, error: Exception | None) -> torch.Tensor | RequestError:
        """Score one request by itself (after its merged batch failed); errors become RequestErrors."""
        try:
            if error is not None:
                raise error
            return (await loop.run_in_executor(self._executor, score_requests, self.model, [work], self.batch_size))[0]
        except Exception as e:
            return await loop.run_in_executor(self._executor, failure, self.name, self.model, work, e, self.batch_size)
