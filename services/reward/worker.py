"""The reward service's Celery worker: task :data:`~shared.protocol.TASK_REWARD` on queue ``reward``.

For each :class:`~shared.protocol.RewardJob` it fetches the trajectory's 8-bit images from the
blob store, scores them with every reward of the job (built once per process and spec, on this
process's device; a ``remote`` reward calls a reward server over HTTP), and pushes a
:class:`~shared.protocol.ScoredBatch` onto the run's Redis list for the trainer.
Failures follow :func:`shared.tasks.guarded_task` (retry transient errors, dead-letter the rest).
Metrics: :mod:`services.reward.worker_app` (served with ``flowrl worker reward --http-port``).
A reward that returns NaN abstains (``None`` in the message); an infinite value is an error.

A worker that serves several runs keeps at most ``FLOWRL_REWARD_WORKER_MAX_MODELS`` (default 4)
reward models: the least recently used one is let go first, never one the current job needs.

    FLOWRL_QUEUE_BROKER_URL=redis://redis:6379/0 flowrl worker reward
"""

from __future__ import annotations

import gc
import math
import os
import socket
import threading
import time
from collections import OrderedDict

import torch

from shared.config import RewardSpec
from shared.protocol import TASK_REWARD, RewardJob, ScoredBatch
from shared.queue import from_environment, make_celery
from shared.tasks import guarded_task

settings = from_environment()  # a bad FLOWRL_QUEUE_* value: an error naming it
app = make_celery(settings, name="flowrl-reward")
_models: OrderedDict[str, object] = OrderedDict()  # by shared.rewards.multi.reward_identity, oldest use first
_models_lock = threading.Lock()  # a thread-pool worker builds and evicts one job at a time
MAX_MODELS_ENV = "FLOWRL_REWARD_WORKER_MAX_MODELS"
_stores: dict[str, object] = {}
_pixels = threading.local()  # each thread's float image buffer, refilled by its next job


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def score_job(job: RewardJob, *, worker: str = "") -> ScoredBatch:
    """Score one trajectory with the job's rewards (models cached per process)."""
    from shared.rewards.multi import score_specs
    from shared.store import BlobStore

    t0 = time.perf_counter()
    traj = job.trajectory
    if traj.store_url not in _stores:
        _stores[traj.store_url] = BlobStore(traj.store_url)
    store = _stores[traj.store_url]
    specs = [RewardSpec(**s) for s in job.rewards]
    models = job_models(specs, _device())
    # rewards score synchronously and keep no reference, so the next job may refill the buffer
    images = _pixels.buf = store.get_images(traj.images, out=getattr(_pixels, "buf", None))
    scores = score_specs(models, specs, images, traj.prompts, torch.tensor(traj.group_ids),
                         sample_ids=traj.sample_ids,  # an inf reward's error names the sample id
                         datasets=traj.datasets,  # rewards[].datasets: each reward scores its sources
                         metadata=traj.metadata,  # dataset row metadata, for rewards that read it
                         condition_images=lambda: condition_images(store, traj))
    as_list = lambda t: [None if math.isnan(x) else x for x in t.tolist()]  # noqa: E731
    return ScoredBatch(trajectory=traj, rewards={k: as_list(v) for k, v in scores.items()},
                       worker=worker, seconds=time.perf_counter() - t0)


def max_models() -> int:
    """How many reward models one worker process keeps (``FLOWRL_REWARD_WORKER_MAX_MODELS``, >= 1)."""
    raw = os.environ.get(MAX_MODELS_ENV, "4")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{MAX_MODELS_ENV}={raw!r} must be a whole number >= 1 (how many reward models "
                         f"a worker keeps loaded). Fix: unset it (4) or set e.g. {MAX_MODELS_ENV}=2.")
    return n


def check_environment() -> None:
    """Called by ``flowrl worker reward`` before it takes tasks: a bad setting stops it at once."""
    max_models()


def job_models(specs, device: str) -> dict[str, object]:
    """``{label: model}`` for one job's reward entries, from this process's cache.

    One model per reward, dtype, device and options (:func:`shared.rewards.multi.reward_identity`):
    entries that differ only in name, weight, batch size or routing, in this job or another run's,
    share it. Beyond :func:`max_models` the least recently used models are dropped (a worker serving
    run after run with other rewards kept every one, until the GPU ran out); those this job uses
    stay, however many."""
    from shared.rewards.multi import build_rewards, reward_identity, resolve_device

    cap = max_models()
    with _models_lock:
        used = {reward_identity(s, resolve_device(s.device, device)) for s in specs}
        # room first: the models this job lacks load after the least recently used others left (loaded
        # next to a full cache, the new one was where the GPU ran out)
        missing = len(used - set(_models))
        others = [key for key in _models if key not in used]  # oldest use first
        dropped = others[:max(0, len(_models) + missing - max(cap, len(used)))]
        for key in dropped:
            del _models[key]
        if dropped:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        models = build_rewards(specs, device, built=_models)
        for key in used:
            _models.move_to_end(key)
    return models


def condition_images(store, traj) -> list[list]:
    """Per sample, its condition images (RGB PIL) from the blob store, each blob read once; empty
    lists for a trajectory without any (text-only models)."""
    from shared.condition_images import fetch_rows, open_rows

    if not traj.condition_images:
        return [[] for _ in traj.sample_ids]
    return open_rows(fetch_rows(store, traj.condition_images))


def _reward(task, job: RewardJob, state, attempt: int) -> None:
    from services.reward.worker_app import observe_batch

    scored = score_job(job, worker=os.environ.get("FLOWRL_WORKER_NAME") or f"reward@{socket.gethostname()}")
    state.push_scored(scored)
    observe_batch(scored.rewards, scored.seconds)


def _dead_letter() -> None:
    from services.reward.worker_app import observe_dead_letter

    observe_dead_letter()


reward = guarded_task(app, settings, TASK_REWARD, RewardJob, _reward,
                      job_id=lambda j: j.trajectory.job_id, generation=lambda j: j.trajectory.generation,
                      sample_ids=lambda j: j.trajectory.sample_ids,
                      run_id=lambda j: (j.trajectory.run_id, j.key_prefix),
                      # a re-sampled job is a new trajectory: count deliveries per trajectory
                      delivery_key=lambda j: j.trajectory.tensors.uri,
                      on_dead_letter=_dead_letter)
