"""Transports: how the trainer gets an epoch plan sampled and scored, and publishes weights.

Both carry the same plan in and the same :class:`~trainer.collect.Samples` out, so the
training loop does not know which one it drives:

* :class:`LocalTransport` (``transport: local``, the embedded default): this process rolls
  out with its own sampling weights and scores with its own reward models;
* :class:`CeleryTransport` (``transport: celery``): the plan becomes
  :class:`~shared.protocol.SampleJob`s of whole prompt groups on the ``sample`` queue;
  sampler workers roll out with the newest published policy, reward workers score, and the
  trainer pops :class:`~shared.protocol.ScoredBatch`es from the run's Redis list, keeping
  exactly one score per sample id. Weights are published as a safetensors blob (written
  atomically) whose :class:`~shared.protocol.PolicyPublished` message then replaces the
  run's policy key in Redis: that write is the version bump.

``dispatch(plan, version)`` starts sampling an epoch (``version``: the oldest policy version
the samples may use) and returns a handle; ``collect(handle)`` waits for the result;
``publish(version)`` makes new weights available to samplers; ``epoch_done(epoch)`` frees
what a trained epoch left behind. The
loop dispatches epoch k+1 before training on epoch k when ``train.max_staleness`` is 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import uuid
from pathlib import Path

import torch

from shared.config import Config
from shared.protocol import (QUEUE_REWARD, QUEUE_SAMPLE, TASK_SAMPLE, PolicyPublished, SampleItem,
                             SampleJob, other_start, sample_id)
from shared.queue import redact
from shared.rewards.multi import spec_dicts
from shared.sampling import Rollout, encode_batches, unpack_trajectory
from trainer.collect import EpochPlan, Samples, sample_locally, sampling_params

log = logging.getLogger("flowrl.trainer")


class LocalTransport:
    """Sample and score in this process (see the module docstring)."""

    duplicates = 0  # nothing is ever delivered twice in-process
    dead_letters_seen = 0

    def __init__(self, cfg: Config, adapter, policy, algorithm, rewards: dict) -> None:
        self.cfg, self.adapter, self.policy, self.algorithm, self.rewards = (
            cfg, adapter, policy, algorithm, rewards)

    def publish(self, version: int) -> None:
        """Nothing to send: local sampling uses the live weights."""

    def dispatch(self, plan: EpochPlan, version: int) -> Samples:
        t0 = time.perf_counter()
        cond, roll, scores = sample_locally(self.cfg, self.adapter, self.policy, self.algorithm,
                                            self.rewards, plan)
        return Samples(cond, roll, scores, [version] * len(plan.prompts),
                       {"time/sample_seconds": time.perf_counter() - t0})

    def collect(self, handle: Samples) -> Samples:
        return handle

    def epoch_done(self, epoch: int) -> None:
        """Nothing stored outside this process."""

    def queue_depths(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


@dataclasses.dataclass
class _Pending:
    plan: EpochPlan
    ids: list[str]  # sample id per plan row
    jobs: dict[str, list[str]]  # job id -> its sample ids
    sent_at: float
    messages: dict[str, str] = dataclasses.field(default_factory=dict)  # job id -> SampleJob JSON
    sent: set[str] = dataclasses.field(default_factory=set)  # job ids handed to the broker


class CollectError(RuntimeError):
    """Samples of an epoch could not be collected (dead-lettered tasks, or a timeout)."""


def sample_device(cfg: Config, adapter) -> torch.device:
    """Where an epoch's received samples wait: the transformer's device, or the CPU with
    ``train.offload_samples_to_cpu`` (each micro-batch goes over to train)."""
    if cfg.train.offload_samples_to_cpu:
        return torch.device("cpu")
    return next(adapter.transformer.parameters()).device


def encode_plan(cfg: Config, adapter, plan: EpochPlan):
    """The conditioning of ``plan``'s rows (re-encoded: deterministic, and cached), where
    :func:`sample_device` puts the samples."""
    t = cfg.train
    cond = encode_batches(adapter, plan.prompts, plan.negatives, t.encode_guidance_scale, t.per_device_batch_size,
                          images=plan.condition_images, resolution=t.resolution, num_frames=t.num_frames)
    return cond.to("cpu") if t.offload_samples_to_cpu else cond


def patient_group(cfg: Config, ranks: list[int]):
    """A gloo group (host memory) of the global ``ranks`` whose timeout outlasts the longest collect
    (``queue.collect_timeout_s``) by 10 minutes: trainer processes agree over it on what they
    collected, so one that waits for its samples (a dead sampler's tasks being redelivered, busy reward
    workers) is waited for, where the default group (NCCL: 10 minutes) would stop the run. A
    collective: every process creates every group, with the same ``ranks``."""
    from datetime import timedelta

    import torch.distributed as dist

    return dist.new_group(ranks, timeout=timedelta(seconds=cfg.queue.collect_timeout_s + 600), backend="gloo")


def fewest_over(group, n: int) -> int:
    """The smallest ``n`` over the processes of ``group`` (a :func:`patient_group`)."""
    import torch.distributed as dist

    value = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return int(value)


class CeleryTransport:
    """Sample and score through the Celery queues (see the module docstring).

    Several trainer processes (``accelerate launch ... trainer``, DDP) each run one: rank ``r``
    dispatches its own share of the epoch's groups (jobs ``{run}/e{epoch}/r{r}/j{j}``, marked
    ``trainer_rank``), and pops their scores from its own Redis list; rank 0 alone clears a fresh
    run's keys and publishes the weights (DDP keeps them identical on every rank). A rank that
    lost prompt groups to dead-lettered tasks trains fewer samples, so every rank trims to the
    fewest any rank has (``agree``, over a :func:`patient_group`), keeping the DDP steps in lockstep.
    """

    def __init__(self, cfg: Config, adapter, policy, algorithm, run_id: str, *, world_size: int = 1,
                 rank: int = 0, barrier=None, agree=None, run_dir: Path | None = None, state=None,
                 resume_epoch: int | None = None) -> None:
        """``resume_epoch``: None for a fresh run (the run's Redis keys and ledger are cleared);
        else the first epoch a resumed run trains (what the ledger says about later epochs is
        dropped, and scores still queued for earlier epochs count as duplicates).
        ``barrier()``: waits for every trainer process (needed with ``world_size > 1``: no rank
        marks or sends before rank 0 has cleared a fresh run); ``agree(n)``: the smallest ``n``
        over the processes (default: ``n``, one process)."""
        if world_size > 1 and barrier is None:
            raise ValueError("CeleryTransport: several trainer processes need a barrier "
                             "(trainer.loop passes accelerator.wait_for_everyone)")
        from shared.queue import RunState, make_celery
        from shared.store import BlobStore

        q = cfg.queue
        self.cfg, self.adapter, self.policy, self.algorithm, self.run_id = (
            cfg, adapter, policy, algorithm, run_id)
        self.rank, self.world_size = rank, world_size
        self.agree = agree or (lambda n: n)
        self.app = make_celery(q, name="flowrl-trainer")
        self.state = state or RunState.connect(q.broker_url, run_id, q.key_prefix, rank=rank)
        store_url = q.store_url or f"file://{Path(cfg.output_dir).resolve()}/blobs"
        self.store = BlobStore(store_url)
        self.buffer: dict[str, tuple] = {}  # sample id -> (ScoredBatch, row) popped early
        # epochs already trained: a sample of one arriving again (a redelivered task) is a duplicate; their
        # numbers, not every sample id (a set that grew by a batch of ids an epoch for the whole run)
        self.collected: set[int] = set()
        self.duplicates = 0
        self.dead_letters_seen = 0
        self.loaded: dict[str, Rollout] = {}  # trajectory blobs read ahead of their epoch's end
        self.condition_refs: dict[str, object] = {}  # dataset image path -> its BlobRef (uploaded once)
        # audit trail: one line per sample used for training (id, version, worker, rewards); with
        # several trainer processes one file each (rank r > 0: scored_samples.rank{r}.jsonl)
        mine = "" if rank == 0 else f".rank{rank}"
        self.ledger = None if run_dir is None else Path(run_dir) / f"scored_samples{mine}.jsonl"
        self.first_epoch = resume_epoch or 0
        self.dead_letter_log = None if run_dir is None else Path(run_dir) / f"dead_letters{mine}.jsonl"
        self.letters: list = []  # every dead letter of this run seen so far
        self.outstanding: dict[int, _Pending] = {}  # dispatched epochs not yet collected
        self.received: set[str] = set()  # sample ids popped and not yet trained
        self.published: PolicyPublished | None = None
        self.token = uuid.uuid4().hex  # this trainer's mark in Redis (see _recover)
        if resume_epoch is None:  # a fresh run: nothing of an earlier run with this name counts
            if rank == 0:
                self.state.clear()
                for old in ([] if run_dir is None else Path(run_dir).glob("scored_samples.rank*.jsonl")):
                    old.unlink(missing_ok=True)  # an earlier run's other processes (this one may have fewer)
            if self.ledger is not None:  # (missing_ok: rank 0 may be removing it at the same moment)
                self.ledger.unlink(missing_ok=True)
        elif self.ledger is not None:
            from trainer.resume import truncate_jsonl

            truncate_jsonl(self.ledger, lambda r: r["epoch"] < resume_epoch)
        # this start's id, on every job, policy, trajectory and dead letter: what an earlier start of the
        # trainer left in the queue (it died; this one resumes) is told apart and ignored
        self.generation = self.token[:12] if rank == 0 else ""
        if rank == 0:
            self._redis(lambda: self.state.set_generation(self.generation), "writing the trainer's start")
        if barrier is not None:
            barrier()  # rank 0 has cleared a fresh run's keys before any rank marks or sends
        if rank != 0:
            self.generation = self._redis(self.state.generation, "reading the trainer's start")
        self._redis(lambda: self.state.mark(self.token), "marking the run alive")

    # ------------------------------------------------------------------ weights
    def publish(self, version: int) -> PolicyPublished | None:
        """Write the sampling weights as a blob (atomic), then bump the version in Redis. Rank 0
        only: DDP keeps the weights identical on every trainer process (under FSDP every process
        first takes part in gathering them)."""
        policy = self.policy
        if self.rank != 0 and not policy.sharded:
            return None
        weights = policy.sampling_weights()
        if self.rank != 0:
            return None
        ref = self.store.put_tensors(f"{self.run_id}/policy/v{version}.safetensors",
                                     {k: v.detach().float() for k, v in weights.items()},
                                     durable=True)
        message = PolicyPublished(run_id=self.run_id, version=version, weights=ref,
                                  finetune_type=self.cfg.model.finetune_type,
                                  published_at=time.time(), generation=self.generation)
        self.published = message
        self._redis(lambda: self.state.publish(message), f"publishing policy v{version}")
        if version >= 2:  # keep the previous version: samplers may still be loading it
            self.store.delete_prefix(f"{self.run_id}/policy/v{version - 2}.safetensors")
        return message

    # ------------------------------------------------------------------ sampling
    def dispatch(self, plan: EpochPlan, version: int) -> _Pending:
        t = self.cfg.train
        params = sampling_params(self.cfg, plan, self.algorithm.keep_means)
        K = t.group_size
        groups_per_job = max(1, t.per_device_batch_size // K)
        ids = [sample_id(self.run_id, plan.epoch, g, k % K) for k, g in enumerate(plan.group_ids)]
        jobs: dict[str, list[str]] = {}
        pending_messages: dict[str, str] = {}
        rows_per_job = groups_per_job * K
        for j, start in enumerate(range(0, len(ids), rows_per_job)):
            rows = range(start, min(start + rows_per_job, len(ids)))
            job = SampleJob(
                run_id=self.run_id, job_id=f"{self._epoch_prefix(plan.epoch)}/j{j}", epoch=plan.epoch,
                min_policy_version=version, params=params,
                items=[SampleItem(sample_id=ids[r], prompt=plan.prompts[r],
                                  negative_prompt=plan.negatives[r], group_id=plan.group_ids[r],
                                  seed=plan.seeds[r], dataset=plan.datasets[r] if plan.datasets else "",
                                  init_seed=plan.init_seeds[r] if plan.init_seeds else None,
                                  metadata=plan.metadata[r] if plan.metadata else "",
                                  images=[self._condition_ref(p) for p in (plan.images[r] if plan.images else ())])
                       for r in rows],
                model=self.cfg.model.model_dump(mode="json"), model_seed=t.seed,
                store_url=self.store.url,
                rewards=spec_dicts(self.cfg.rewards), key_prefix=self.cfg.queue.key_prefix,
                trainer_rank=self.rank, generation=self.generation)
            pending_messages[job.job_id] = job.model_dump_json()
            jobs[job.job_id] = [ids[r] for r in rows]
        pending = _Pending(plan, ids, jobs, time.monotonic(), pending_messages)
        self.outstanding[plan.epoch] = pending  # before sending: an outage mid-epoch resends
        for job_id in jobs:
            self._send(pending, job_id)
        return pending

    def _epoch_prefix(self, epoch: int) -> str:
        """Where this process's jobs of ``epoch`` (and their blobs) live: ``{run}/e{epoch}``, or
        ``{run}/e{epoch}/r{rank}`` with several trainer processes."""
        base = f"{self.run_id}/e{epoch}"
        return base if self.world_size == 1 else f"{base}/r{self.rank}"

    def _condition_ref(self, path: str):
        """The blob of a dataset condition image (its file's bytes, unchanged), uploaded once per run
        under ``{run_id}/conditions/`` (kept across epochs)."""
        if path not in self.condition_refs:
            data = Path(path).read_bytes()
            key = f"{self.run_id}/conditions/{hashlib.sha256(data).hexdigest()}{Path(path).suffix}"
            self.condition_refs[path] = self.store.put_bytes(key, data)
        return self.condition_refs[path]

    def _send(self, pending: _Pending, job_id: str) -> None:
        self._redis(lambda: self.app.send_task(TASK_SAMPLE, args=[pending.messages[job_id]],
                                               queue=self.cfg.queue.queue(QUEUE_SAMPLE)),
                    f"sending job {job_id}")
        pending.sent.add(job_id)  # (a recovery inside this call resends only earlier jobs)

    # ------------------------------------------------------------------ Redis outages
    def _redis(self, call, what: str):
        """``call()``, waiting through a Redis outage (logged, backoff up to 5 s) for at most
        ``queue.redis_outage_s``; after an outage, :meth:`_recover` what Redis lost."""
        from kombu.exceptions import OperationalError
        from redis.exceptions import ConnectionError, TimeoutError

        q, down_since, delay = self.cfg.queue, None, 0.5
        while True:
            try:
                result = call()
            except (ConnectionError, TimeoutError, OperationalError, OSError) as e:
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    log.warning("Redis at %s unreachable while %s (%s); waiting up to "
                                "queue.redis_outage_s=%.0f s", redact(q.broker_url), what, e,
                                q.redis_outage_s)
                if now - down_since > q.redis_outage_s:
                    raise CollectError(
                        f"Redis at {redact(q.broker_url)} was unreachable for more than "
                        f"queue.redis_outage_s={q.redis_outage_s:.0f} s while {what}: {e}. Fix: bring "
                        f"Redis back, then continue with `flowrl trainer CONFIG --resume latest`.") from e
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if down_since is not None:
                log.warning("Redis is back after %.1f s", time.monotonic() - down_since)
                self._recover()
            return result

    def _recover(self) -> None:
        """If Redis lost this run's keys (restart without persistence), put back what the run
        needs: the alive token, the current policy, and every dispatched job some of whose
        samples have not arrived (duplicates of jobs that did survive are dropped by id)."""
        if self.state.marked(self.token):
            return  # the data survived (persistence, or only the connection dropped)
        self.state.mark(self.token)
        if self.rank == 0:
            self.state.set_generation(self.generation)
        self.dead_letters_seen = 0  # the run's dead-letter list starts again, empty (those seen are kept)
        if self.published is not None:
            self.state.publish(self.published)
        resent = 0
        for pending in self.outstanding.values():
            for job_id, sids in pending.jobs.items():
                if job_id in pending.sent and not self.received.issuperset(sids):
                    self._send(pending, job_id)
                    resent += 1
        log.warning("Redis lost run %s's data (restarted without persistence?): re-published "
                    "policy v%s and re-dispatched %d job(s) whose samples had not all arrived",
                    self.run_id, None if self.published is None else self.published.version, resent)

    def collect(self, pending: _Pending) -> Samples:
        """Wait for one score per sample id of ``pending`` (see :class:`CollectError`).

        A dead-lettered task's samples cannot arrive: with ``queue.on_dead_letter:
        drop_groups`` their whole prompt groups leave the epoch (reported, kept in
        ``dead_letters.jsonl``) and the rest is trained; with ``stop`` the run stops.
        """
        q = self.cfg.queue
        need = set(pending.ids)
        got: dict[str, tuple] = {sid: self.buffer.pop(sid) for sid in list(self.buffer) if sid in need}
        deadline = time.monotonic() + q.collect_timeout_s
        dropped: list[str] = []
        while len(got) < len(need):
            for sid in self._redis(lambda: self._check_dead_letters(pending, need - set(got)),
                                   "reading dead letters"):
                need.discard(sid)
                got.pop(sid, None)
                dropped.append(sid)
            if len(got) >= len(need):
                break
            batch = self._redis(lambda: self.state.pop_scored(timeout=0.5), "waiting for scores")
            if batch is None:
                self._redis(self._recover, "checking the run's keys")  # a restart between calls
                if time.monotonic() > deadline:
                    raise CollectError(
                        f"epoch {pending.plan.epoch}: {len(need) - len(got)} of {len(need)} samples "
                        f"not scored after queue.collect_timeout_s={q.collect_timeout_s:.0f} s. Are "
                        f"sampler workers consuming queue 'sample' and reward workers queue 'reward' "
                        f"on {q.broker_url}?")
                continue
            kept = False
            # trained before a resume, or sampled for an earlier start of the trainer (its plan and weights)
            stale = batch.trajectory.epoch < self.first_epoch or self._foreign(batch.trajectory.generation)
            for row, sid in enumerate(batch.trajectory.sample_ids):
                if stale or batch.trajectory.epoch in self.collected or sid in got or sid in self.buffer:
                    self.duplicates += 1  # a redelivered task scored it again: keep the first
                elif sid in need:
                    got[sid], kept = (batch, row), True
                    self.received.add(sid)
                elif sid not in pending.ids:
                    self.buffer[sid], kept = (batch, row), True  # a later epoch (max_staleness 1)
                    self.received.add(sid)
            if kept:  # read its tensors now, while the other batches are still being sampled
                self._trajectory(batch.trajectory.tensors)
        rows = [r for r, sid in enumerate(pending.ids) if sid in need]
        had = len(rows)
        keep = self.agree(had)  # every trainer process trains as many samples (DDP lockstep)
        if keep < len(rows):  # rows are whole groups in plan order, and every count is whole groups
            cut = [pending.ids[r] for r in rows[keep:]]
            log.warning("epoch %d: another trainer process lost prompt groups to dead-lettered tasks; "
                        "this one trains %d of its %d scored samples too (dropped: %s)",
                        pending.plan.epoch, keep, len(rows), ", ".join(cut))
            dropped.extend(cut)
            rows = rows[:keep]
        if not rows:
            whose = "" if self.world_size == 1 else (
                " of this trainer process's share" if not had else " of another trainer process's share")
            raise CollectError(f"epoch {pending.plan.epoch}: every prompt group{whose} was dropped after "
                               f"dead-lettered tasks (see {self.dead_letter_log} and any dead_letters.rank*.jsonl "
                               f"beside it); nothing to train on.")
        self.collected.add(pending.plan.epoch)
        self.received.difference_update(pending.ids)
        self.outstanding.pop(pending.plan.epoch, None)
        self._record(pending, got, rows)
        samples = self._assemble(pending, got, rows)
        for batch, _ in got.values():  # (also the rows another process's losses cut: read, not trained)
            self.loaded.pop(batch.trajectory.tensors.uri, None)
        samples.metrics.update({"queue/collect_seconds": time.monotonic() - pending.sent_at,
                                "queue/duplicates_total": float(self.duplicates),
                                "queue/dropped_samples": float(len(dropped))})
        if dropped:
            samples.rows = rows
        return samples

    def _record(self, pending: _Pending, got: dict[str, tuple], rows: list[int]) -> None:
        if self.ledger is None:
            return
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        with self.ledger.open("a") as f:
            for sid in (pending.ids[r] for r in rows):
                batch, row = got[sid]
                f.write(json.dumps({
                    "epoch": pending.plan.epoch, "sample_id": sid,
                    "policy_version": batch.trajectory.policy_version,
                    "sampler": batch.trajectory.worker, "scorer": batch.worker,
                    "rewards": {k: v[row] for k, v in batch.rewards.items()}}) + "\n")

    def _foreign(self, generation: str) -> bool:
        """Of another start of the trainer than this one (:func:`shared.protocol.other_start`)."""
        return other_start(generation, self.generation)

    def _check_dead_letters(self, pending: _Pending, missing: set[str]) -> list[str]:
        """Sample ids of ``pending`` to drop: every member of each prompt group that lost a
        sample to a dead-lettered task (or raise, with ``queue.on_dead_letter: stop``)."""
        new = self.state.dead_letters(self.dead_letters_seen)
        self.dead_letters_seen += len(new)
        self.letters.extend(new)  # kept: a letter may concern an epoch collected later
        drop: list[str] = []
        group_of = dict(zip(pending.ids, pending.plan.group_ids))
        for letter in self.letters:
            if self._foreign(letter.generation):  # an earlier start's task: this one dispatched its work anew
                continue
            lost = missing.intersection(letter.sample_ids) - set(drop)
            if not lost:  # (a dead copy of a job whose other delivery arrived loses nothing)
                continue
            what = (f"epoch {pending.plan.epoch}: task {letter.task} for job {letter.job_id} was "
                    f"dead-lettered after {letter.attempts} attempt(s): {letter.error}. Samples lost: "
                    f"{', '.join(sorted(lost))}.")
            if self.cfg.queue.on_dead_letter == "stop":
                raise CollectError(what + " The epoch cannot complete (queue.on_dead_letter: stop).")
            groups = {group_of[sid] for sid in lost}
            ids = [sid for sid in pending.ids if group_of[sid] in groups]
            drop.extend(sid for sid in ids if sid not in drop)
            log.warning("%s Dropping prompt group(s) %s (%d samples) from this epoch "
                        "(queue.on_dead_letter: drop_groups).", what, sorted(groups), len(ids))
            if self.dead_letter_log is not None:
                with self.dead_letter_log.open("a") as f:
                    f.write(json.dumps({**letter.model_dump(mode="json"), "epoch": pending.plan.epoch,
                                        "lost": sorted(lost), "dropped_groups": sorted(groups),
                                        "dropped_samples": ids}) + "\n")
        return drop

    def _assemble(self, pending: _Pending, got: dict[str, tuple], rows: list[int]) -> Samples:
        """The scored trajectories of plan ``rows``, in plan order, as one Rollout + rewards."""
        ids = [pending.ids[r] for r in rows]
        picks = [(self._trajectory(got[sid][0].trajectory.tensors), got[sid][1])
                 for sid in ids]  # (trajectory, row) per sample, in plan order
        device = sample_device(self.cfg, self.adapter)
        stack = lambda f: torch.stack([getattr(p, f)[r] for p, r in picks]).to(device)  # noqa: E731
        first = picks[0][0]
        if first.sde_steps != list(pending.plan.sde_steps):
            raise CollectError(f"epoch {pending.plan.epoch}: samplers rolled out SDE steps "
                               f"{first.sde_steps}, the plan says {pending.plan.sde_steps}")
        roll = Rollout(final_latents=stack("final_latents"), images=None, sigmas=first.sigmas,
                       sde_steps=first.sde_steps, latents=stack("latents"),
                       next_latents=stack("next_latents"), log_probs=stack("log_probs"),
                       stds=stack("stds"), means=stack("means") if first.means is not None else None)
        labels = [s.label for s in self.cfg.rewards]
        rewards = {label: torch.tensor([float("nan") if (v := got[sid][0].rewards[label][got[sid][1]]) is None
                                        else v for sid in ids], dtype=torch.float32)
                   for label in labels}
        versions = [got[sid][0].trajectory.policy_version for sid in ids]
        cond = encode_plan(self.cfg, self.adapter, pending.plan.subset(rows))
        workers = {got[sid][0].trajectory.worker for sid in ids}
        return Samples(cond, roll, rewards, versions, {"queue/samplers": float(len(workers))})

    def _trajectory(self, ref) -> Rollout:
        """The unpacked trajectory blob ``ref`` (read once, kept until its epoch is assembled)."""
        if ref.uri not in self.loaded:
            self.loaded[ref.uri] = unpack_trajectory(self.store.get_tensors(ref))
        return self.loaded[ref.uri]

    def queue_depths(self) -> dict[str, int]:
        """Tasks waiting in the sample and reward queues (Redis list lengths)."""
        q = self.cfg.queue
        return {name: int(self.state.redis.llen(q.queue(name))) for name in (QUEUE_SAMPLE, QUEUE_REWARD)}

    def epoch_done(self, epoch: int) -> int:
        """Delete this process's blobs of a trained epoch (garbage collection); returns how many."""
        return self.store.delete_prefix(self._epoch_prefix(epoch))

    def close(self) -> None:
        self.app.close()

