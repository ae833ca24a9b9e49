"""What one sampler process does with a job, independent of Celery (so tests can call it).

A :class:`SamplerRuntime` lives in one worker process (one GPU). It loads the job's model on
first use (after the worker forked, so CUDA is initialised in the process that uses it),
keeps it for later jobs, and before every job makes sure it holds the newest published policy
version that the job allows: it waits for ``min_policy_version`` to be published, then copies
the published weights in by parameter name (LoRA hot-swap, or full weights).

Outputs go to the blob store under ``{job_id}/a{attempt}-{delivery}/``, ``delivery`` a fresh id per
start of the task (a retried or redelivered task never overwrites what an earlier start may already
have handed on: a redelivery keeps the retry count, and a worker that died after sending the
reward job but before its ack was re-run into the same path, which a GPU's non-deterministic
re-roll then replaced under the queued reward job): the trajectory tensors
(:func:`shared.sampling.pack_trajectory`) and the 8-bit images, one safetensors blob each.

Writing overlaps sampling: a job is rolled out one micro-batch (``params.batch_size``) at a
time, and a :class:`TrajectoryWriter` streams each finished micro-batch's states and pixels into
both blobs from background threads while the next micro-batch samples. Only the last
micro-batch's share (and the small per-sample tensors) is written after sampling ends. The task
still returns, and so is acknowledged, only once both blobs are complete, so a worker that dies
mid-write leaves its job to be redelivered as before.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import uuid
from typing import Any

import torch

from shared.condition_images import fetch_rows
from shared.config import ModelConfig
from shared.models import load_adapter
from shared.models.lora import compile_transformer, load_named_parameters, prepare_transformer
from shared.models.warm_start import warm_start
from shared.protocol import PolicyPublished, SampleJob, Trajectory, other_start
from shared.queue import RunState
from shared.sampling import pack_trajectory, rollout_autocast, rollout_with
from shared.store import BlobStore, Entry, to_uint8, uint8_chunks


class PolicyTimeout(TimeoutError):
    """The job needs a policy version that was not published in time."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SamplerRuntime:
    """One process's model, policy version and stores (see the module docstring)."""

    def __init__(self, *, device: torch.device | None = None, policy_wait_s: float = 600.0,
                 name: str | None = None) -> None:
        self.device = device
        self.policy_wait_s = policy_wait_s
        self.name = name or f"sampler@{socket.gethostname()}"
        self.adapter = None
        self.model_key: str | None = None
        self.version: int | None = None
        self.weights_sha: str | None = None
        self._stores: dict[str, BlobStore] = {}

    # ------------------------------------------------------------------ state
    def store(self, url: str) -> BlobStore:
        if url not in self._stores:
            self._stores[url] = BlobStore(url)
        return self._stores[url]

    def ensure_model(self, model: dict[str, Any], seed: int = 0) -> None:
        key = json.dumps([model, seed], sort_keys=True)
        if key == self.model_key:
            return
        cfg = ModelConfig(**model)
        device = self.device or default_device()
        adapter = load_adapter(cfg, device=device, seed=seed)
        if cfg.finetune_type == "lora":  # model.init_from: the base the published LoRA was trained on
            warm_start(cfg, adapter, "before")
        prepare_transformer(adapter, cfg)
        compile_transformer(adapter, cfg)  # model.compile, as the trainer does
        adapter.transformer.eval()
        self.adapter, self.model_key, self.version = adapter, key, None

    def ensure_policy(self, state: RunState, job: SampleJob) -> PolicyPublished:
        """Wait until a version >= ``job.min_policy_version`` is published; load it if newer.
        :class:`StaleJob` when the run's policy comes from another start of the trainer than the job."""
        deadline = time.monotonic() + self.policy_wait_s
        while True:
            published = state.policy()
            stale_check(job, state.generation())  # (each poll: a resumed trainer may start meanwhile)
            # (a policy of another start than the job's: its trainer has not published yet)
            mine = published is not None and not other_start(published.generation, job.generation)
            if mine and published.version >= job.min_policy_version:
                break
            if time.monotonic() > deadline:
                have = None if published is None else published.version
                raise PolicyTimeout(
                    f"job {job.job_id} needs policy version >= {job.min_policy_version}, but after "
                    f"{self.policy_wait_s:.0f} s the newest published one is {have}. Is the trainer "
                    f"of run {job.run_id!r} alive and using the same Redis ({state.keys.policy})?")
            time.sleep(0.05)
        # compare the blob, not only the number: a trainer resumed from a checkpoint publishes
        # the same version numbers again, with the checkpoint's weights
        if (published.version, published.weights.sha256) != (self.version, self.weights_sha):
            weights = self.store(job.store_url).get_tensors(published.weights)
            load_named_parameters(self.adapter.transformer, weights)
            self.version, self.weights_sha = published.version, published.weights.sha256
        return published

    # ------------------------------------------------------------------ one job
    def condition_images(self, store_url: str, items) -> list[list[bytes]] | None:
        """Per item, its condition images' file bytes from the blob store (edit models; each blob
        read once), or ``None`` when no item has any."""
        if not any(i.images for i in items):
            return None
        return fetch_rows(self.store(store_url), [i.images for i in items])

    def run(self, job: SampleJob, state: RunState, attempt: int = 0) -> Trajectory:
        t0 = time.perf_counter()
        stale_check(job, state.generation())  # before loading anything for it
        self.ensure_model(job.model, job.model_seed)
        published = self.ensure_policy(state, job)
        items, bs = job.items, job.params.batch_size
        writer = TrajectoryWriter(self.store(job.store_url), job, attempt=attempt)
        try:
            for s in range(0, len(items), bs):  # one micro-batch at a time; the writer streams each
                part = items[s:s + bs]
                init_seeds = ([i.init_seed if i.init_seed is not None else i.seed for i in part]
                              if any(i.init_seed is not None for i in part) else None)
                with rollout_autocast(self.adapter, job.params.autocast):  # the trainer's mixed precision
                    _, roll = rollout_with(self.adapter, [i.prompt for i in part], [i.negative_prompt for i in part],
                                           [i.seed for i in part], job.params, transformer=self.adapter.transformer,
                                           images=self.condition_images(job.store_url, part), init_seeds=init_seeds)
                writer.add(roll)
        except BaseException:
            writer.abort()
            raise
        return writer.finish(published.version, worker=self.name, seconds=time.perf_counter() - t0)


class StaleJob(Exception):
    """The job was dispatched by an earlier start of the run's trainer (it died; a resumed one now
    publishes): its plan and weights are gone, and the resumed trainer dispatches that work again."""


def stale_check(job: SampleJob, current: str) -> None:
    """Raise :class:`StaleJob` when the run's trainer start now (``current``, :meth:`RunState.generation`:
    written before that start dispatches anything) is another than the one that dispatched ``job``. A
    policy published by another start than the job's is not stale but early: the job's trainer (a
    resumed one whose first process has not published yet) is waited for."""
    if other_start(job.generation, current):
        raise StaleJob(f"job {job.job_id} of run {job.run_id!r} was dispatched by an earlier start of its trainer "
                       f"(generation {job.generation}; the run's trainer now is {current}): skipped, the resumed "
                       f"trainer dispatches its samples again")


_END, _ABORT = object(), object()


class TrajectoryWriter:
    """Streams one job's trajectory and image blobs while the job is still being sampled.

    :meth:`add` hands over each micro-batch's :class:`~shared.sampling.Rollout` (rows in job
    order) and returns at once; two background threads pack, convert, hash and write the rows
    as they come (the states of a micro-batch and its pixels are the next bytes of each blob).
    On a GPU the packing and the 8-bit conversion run on the device in :meth:`add`, which then
    moves the (halved / 8-bit) rows to the host once. :meth:`finish` writes what only the last
    micro-batch completes (its rows, then final latents, log-probs, stds, means: small), waits
    for both blobs and returns the :class:`Trajectory`; :meth:`abort` drops a half-written job
    (its temporary files are removed). Blobs carry XXH3-128 digests (:mod:`shared.store`)."""

    def __init__(self, store: BlobStore, job: SampleJob, *, attempt: int = 0) -> None:
        self.store, self.job = store, job
        self.base = f"{job.job_id}/a{attempt}-{uuid.uuid4().hex[:8]}"  # (module docstring)
        self.n = len(job.items)
        self.sde_steps: list[int] | None = None
        self._queues = {"tensors": queue.Queue(), "images": queue.Queue()}
        self._refs: dict = {}
        self._errors: list[BaseException] = []
        self._closed: set = set()  # queues whose end (or abort) a writer thread has taken
        self._threads = [threading.Thread(target=self._run, args=(name, fn), daemon=True,
                                          name=f"flowrl-writer-{name}")
                         for name, fn in (("tensors", self._write_tensors), ("images", self._write_images))]
        for t in self._threads:
            t.start()

    # ---------------------------------------------------------------- caller side
    def add(self, roll) -> None:
        if self._errors:
            raise self._errors[0]
        self.sde_steps = roll.sde_steps
        if roll.final_latents.device.type != "cpu":  # device work here, one copy to the host
            packed = {k: v.cpu() for k, v in pack_trajectory(roll, self.job.params.state_dtype).items()}
            images = to_uint8(roll.images).cpu()
        else:  # CPU: packing and conversion run in the writer threads
            packed, images = roll, roll.images
        self._queues["tensors"].put(packed)
        self._queues["images"].put(images)

    def abort(self) -> None:
        for q in self._queues.values():
            q.put(_ABORT)
        for t in self._threads:
            t.join()

    def finish(self, policy_version: int, *, worker: str = "", seconds: float = 0.0) -> Trajectory:
        for q in self._queues.values():
            q.put(_END)
        for t in self._threads:
            t.join()
        if self._errors:
            raise self._errors[0]
        items = self.job.items
        return Trajectory(
            run_id=self.job.run_id, job_id=self.job.job_id, epoch=self.job.epoch,
            policy_version=policy_version, sample_ids=[i.sample_id for i in items],
            group_ids=[i.group_id for i in items], prompts=[i.prompt for i in items],
            sde_steps=self.sde_steps, store_url=self.job.store_url, tensors=self._refs["tensors"],
            images=self._refs["images"], worker=worker, seconds=seconds, trainer_rank=self.job.trainer_rank,
            generation=self.job.generation,
            datasets=[i.dataset for i in items] if any(i.dataset for i in items) else [],
            metadata=[i.metadata for i in items] if any(i.metadata for i in items) else [],
            condition_images=[list(i.images) for i in items] if any(i.images for i in items) else [])

    # ---------------------------------------------------------------- writer threads
    def _run(self, name: str, fn) -> None:
        q = self._queues[name]
        try:
            self._refs[name] = fn(q)
        except BaseException as e:  # noqa: BLE001 - handed to the caller by add / finish
            self._errors.append(e)
            while q not in self._closed:  # drain up to the end, so the caller's join returns
                self._next(q, drain=True)

    def _next(self, q: queue.Queue, first: bool = False, drain: bool = False):
        item = q.get()
        if item is _END or item is _ABORT:
            self._closed.add(q)
        if drain:
            return None
        if item is _ABORT:
            raise _Aborted()
        if item is _END and first:
            raise ValueError("a trajectory needs at least one micro-batch. Fix: call add(roll) "
                             "before finish().")
        return None if item is _END else item

    def _packed(self, item) -> dict:
        return item if isinstance(item, dict) else pack_trajectory(item, self.job.params.state_dtype)

    def _write_tensors(self, q: queue.Queue):
        first = self._packed(self._next(q, first=True))
        parts = [first]

        def states():
            p = first
            while p is not None:
                yield p["states"]
                item = self._next(q)
                p = None if item is None else self._packed(item)
                if p is not None:
                    parts.append(p)

        def rows(key: str):
            return lambda: (p[key] for p in parts)

        def whole(key: str):
            return lambda: (first[key],)

        st = first["states"]
        entries = {"states": Entry(st.dtype, (self.n, *st.shape[1:]), states)}  # streamed: first
        for key in ("final_latents", "log_probs", "stds", "means"):
            if key in first:
                t = first[key]
                entries[key] = Entry(t.dtype, (self.n, *t.shape[1:]), rows(key))
        for key in ("sigmas", "state_steps", "sde_steps"):
            entries[key] = Entry(first[key].dtype, tuple(first[key].shape), whole(key))
        return self.store.put_entries(f"{self.base}/trajectory.safetensors", entries,
                                      digest="xxh3_128", keep_order=True)

    def _write_images(self, q: queue.Queue):
        first = self._next(q, first=True)
        if first.ndim < 3 or first.shape[-3] != 3:
            raise ValueError(f"images must be [..., 3, H, W] float in [0, 1], got shape {tuple(first.shape)}")

        def pixels():
            imgs = first
            while imgs is not None:
                if imgs.dtype == torch.uint8:  # converted on the device already
                    yield imgs
                else:
                    yield from uint8_chunks(imgs)
                imgs = self._next(q)

        return self.store.put_entries(f"{self.base}/images.safetensors",
                                      {"images_chw": Entry(torch.uint8, (self.n, *first.shape[1:]), pixels)},
                                      digest="xxh3_128")


class _Aborted(Exception):
    """The job's sampling failed: drop the half-written blobs."""


def write_trajectory(store: BlobStore, job: SampleJob, roll, policy_version: int, *, attempt: int = 0,
                     worker: str = "", seconds: float = 0.0) -> Trajectory:
    """Store a whole job's rollout (tensors + 8-bit images) and describe it as a
    :class:`Trajectory` (a :class:`TrajectoryWriter` given the rollout as one part)."""
    writer = TrajectoryWriter(store, job, attempt=attempt)
    try:
        writer.add(roll)
    except BaseException:
        writer.abort()
        raise
    return writer.finish(policy_version, worker=worker, seconds=seconds)
