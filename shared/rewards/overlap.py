"""Score each rolled-out micro-batch while the next one is being sampled.

The embedded trainer rolls an epoch out in micro-batches (:func:`shared.sampling.rollout_batches`)
and used to score all of it afterwards, so the accelerator idled while rewards ran. A
:class:`BackgroundScorer` takes each micro-batch as soon as it is decoded (``submit``, the
rollout's ``on_batch`` hook) and scores it with :func:`~shared.rewards.multi.score_specs` in
one background thread; ``result()`` waits for the last one and returns exactly what scoring the
whole epoch at once returns (pointwise rewards score each sample on its own).

Only pointwise rewards can be scored a micro-batch at a time: a groupwise or pairwise reward
needs whole groups, which micro-batches may split (:func:`can_overlap`). On a GPU the scoring
thread runs on its own CUDA stream, ordered after the kernels that made the images, so reward
kernels, host syncs and the reward's CPU work (preprocessing, HTTP to a reward server) overlap
the next micro-batch's denoising. Grad mode is per thread: the scoring thread uses the one in
effect where the scorer was made, as scoring in the caller's thread did; autocast is off in both
(:func:`shared.rewards.multi.score_specs`: each reward runs in its own dtype).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from shared.rewards.base import RewardModel
from shared.rewards.multi import score_specs


def can_overlap(rewards: dict[str, RewardModel]) -> bool:
    """True when every reward is pointwise (a micro-batch can be scored without its groups)."""
    return bool(rewards) and all(r.kind == "pointwise" for r in rewards.values())


class BackgroundScorer:
    """Scores micro-batches of one epoch in a background thread (see the module docstring).

    Args:
        rewards, specs: the configured reward set (:func:`~shared.rewards.multi.build_rewards`)
            and its ``rewards:`` entries; every reward must be pointwise (:func:`can_overlap`).
        prompts: the epoch's ``N`` prompts, in rollout order.
        group_ids: ``[N]`` int64 group ids (named in error messages).
        condition_images: ``rows -> per-row condition images`` for a ``slice`` of the epoch,
            called in the scoring thread only when some reward reads them; None: none.

    Use as a context manager so that a failed rollout does not leave scoring running.
    """

    def __init__(self, rewards: dict[str, RewardModel], specs, prompts: Sequence[str],
                 group_ids: torch.Tensor, condition_images: Callable[[slice], list] | None = None,
                 datasets: Sequence[str] | None = None, metadata: Sequence[str] | None = None) -> None:
        if not can_overlap(rewards):
            raise ValueError("BackgroundScorer scores micro-batches on their own, so every reward must be "
                             "pointwise; score groupwise/pairwise rewards after the rollout (score_specs)")
        self.rewards, self.specs, self.prompts, self.group_ids = rewards, specs, list(prompts), group_ids
        self.condition_images = condition_images
        self.datasets = list(datasets) if datasets else None  # data.datasets name per row (routing)
        self.metadata = list(metadata) if metadata else None  # row metadata per row (JSON text)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowrl-score")
        self._parts: list[tuple[int, Future]] = []
        self._stream = None  # the scoring thread's CUDA stream, made on first use
        self._grad = torch.is_grad_enabled()

    def __enter__(self) -> "BackgroundScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop: queued micro-batches are dropped, a running one finishes."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, rows: slice, roll) -> None:
        """Queue rows ``rows`` of the epoch (their :class:`~shared.sampling.Rollout`) for scoring;
        returns at once."""
        images = roll.images
        ready = None
        if images.is_cuda:  # the scoring stream waits for the kernels that made the images
            ready = torch.cuda.Event()
            ready.record()
        self._parts.append((rows.start, self._pool.submit(self._score, rows, images, ready)))

    def _score(self, rows: slice, images: torch.Tensor, ready) -> dict[str, torch.Tensor]:
        conditions = (lambda: self.condition_images(rows)) if self.condition_images else None
        with contextlib.ExitStack() as modes:
            modes.enter_context(torch.set_grad_enabled(self._grad))
            if ready is not None:
                if self._stream is None:
                    self._stream = torch.cuda.Stream(device=images.device)
                self._stream.wait_event(ready)
                images.record_stream(self._stream)  # not reused by the sampler until scoring is done
                modes.enter_context(torch.cuda.stream(self._stream))
            # score_specs returns CPU tensors, so the stream's work is done when it returns
            return score_specs(self.rewards, self.specs, images, self.prompts[rows], self.group_ids[rows],
                               condition_images=conditions, first_index=rows.start,
                               datasets=None if self.datasets is None else self.datasets[rows],
                               metadata=None if self.metadata is None else self.metadata[rows])

    def result(self) -> dict[str, torch.Tensor]:
        """``{label: [N] float32 CPU}`` for every submitted row, in row order (the first error a
        micro-batch raised is raised here, naming the sample's position in the epoch)."""
        try:
            parts = sorted(((start, f.result()) for start, f in self._parts), key=lambda p: p[0])
        finally:
            self.close()
        if not parts:
            return {s.label: torch.empty(0) for s in self.specs}
        return {s.label: torch.cat([p[s.label] for _, p in parts]) for s in self.specs}
