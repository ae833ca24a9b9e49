"""What one sampler process does with a job, independent of Celery (so tests can call it).

A :class:`SamplerRuntime` lives in one worker process (one GPU). It loads the job's model on
first use (after the worker forked, so CUDA is initialised in the process that uses it),
keeps it for later jobs, and before every job makes sure it holds the newest published policy
version that the job allows: it waits for ``min_policy_version`` to be published, then copies
the published weights in by parameter name (LoRA hot-swap, or full weights).

Outputs go to the blob store under ``{job_id}/a{attempt}/`` (a redelivered task never
overwrites what an earlier attempt may already have handed on): the trajectory tensors
(:func:`shared.sampling.pack_trajectory`) and the 8-bit images, one safetensors blob each.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from shared.config import ModelConfig
from shared.models import load_adapter
from shared.models.lora import load_named_parameters, prepare_transformer
from shared.protocol import PolicyPublished, SampleJob, Trajectory
from shared.queue import RunState
from shared.sampling import pack_trajectory, rollout_with
from shared.store import BlobStore


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
        prepare_transformer(adapter, cfg)
        adapter.transformer.eval()
        self.adapter, self.model_key, self.version = adapter, key, None

    def ensure_policy(self, state: RunState, job: SampleJob) -> PolicyPublished:
        """Wait until a version >= ``job.min_policy_version`` is published; load it if newer."""
        deadline = time.monotonic() + self.policy_wait_s
        while True:
            published = state.policy()
            if published is not None and published.version >= job.min_policy_version:
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
    def run(self, job: SampleJob, state: RunState, attempt: int = 0) -> Trajectory:
        t0 = time.perf_counter()
        self.ensure_model(job.model, job.model_seed)
        published = self.ensure_policy(state, job)
        items = job.items
        _, roll = rollout_with(self.adapter, [i.prompt for i in items], [i.negative_prompt for i in items],
                               [i.seed for i in items], job.params, transformer=self.adapter.transformer)
        return write_trajectory(self.store(job.store_url), job, roll, published.version,
                                attempt=attempt, worker=self.name, seconds=time.perf_counter() - t0)


def write_trajectory(store: BlobStore, job: SampleJob, roll, policy_version: int, *, attempt: int = 0,
                     worker: str = "", seconds: float = 0.0) -> Trajectory:
    """Store a job's rollout (tensors + 8-bit images) and describe it as a :class:`Trajectory`."""
    base = f"{job.job_id}/a{attempt}"
    with ThreadPoolExecutor(1) as pool:  # conversion, hashing and I/O release the GIL
        images_f = pool.submit(store.put_images, f"{base}/images.safetensors", roll.images,
                               digest="xxh3_128")  # rollout blobs: fast digest (shared.store)
        tensors = store.put_tensors(f"{base}/trajectory.safetensors",
                                    pack_trajectory(roll, job.params.state_dtype),
                                    digest="xxh3_128")
        images = images_f.result()
    items = job.items
    return Trajectory(
        run_id=job.run_id, job_id=job.job_id, epoch=job.epoch, policy_version=policy_version,
        sample_ids=[i.sample_id for i in items], group_ids=[i.group_id for i in items],
        prompts=[i.prompt for i in items], sde_steps=roll.sde_steps, store_url=job.store_url,
        tensors=tensors, images=images, worker=worker, seconds=seconds)
