"""Every task, queue and Redis key name of the distributed mode, in one place.

Producers and consumers import these names instead of spelling strings, so a rename is one
edit. Redis keys are namespaced ``{prefix}:{run_id}:...`` so several runs (and tests) share
one Redis without touching each other's data.
"""

from __future__ import annotations

PROTOCOL_VERSION = 9  # 2: BlobRef digests may be xxh3_128 instead of sha256; 3: SampleItem.images; 4: Trajectory.condition_images;
# 5: SampleJob / Trajectory.trainer_rank (the trainer process a job's scores go back to), SampleItem.dataset /
# Trajectory.datasets (each sample's data.datasets source, for rewards[].datasets), SampleItem.init_seed
# 6: SamplingParams.autocast (samplers roll out under the trainer's mixed precision)
# 7: SampleItem.metadata / Trajectory.metadata (each sample's dataset row metadata, for rewards that read it)
# 8: SamplingParams.tail_solver / tail_ratio (the ODE steps after the last SDE step on a coarser grid)
# 9: SampleJob / Trajectory / PolicyPublished / DeadLetter.generation (the trainer start they are of)

# Celery queues and task names
QUEUE_SAMPLE = "sample"
QUEUE_REWARD = "reward"
TASK_SAMPLE = "flowrl.sample"
TASK_REWARD = "flowrl.reward"

DEFAULT_KEY_PREFIX = "flowrl"


class RunKeys:
    """Redis keys of one run.

    * ``scored``: list of :class:`~shared.protocol.ScoredBatch` JSON, pushed by reward workers,
      popped by the trainer; with several trainer processes each has its own list,
      :meth:`scored_for` (rank 0's is ``scored``);
    * ``policy``: the latest :class:`~shared.protocol.PolicyPublished` JSON (one string, replaced
      atomically: the version bump IS this write);
    * ``dead``: list of :class:`~shared.protocol.DeadLetter` JSON (tasks that gave up);
    * ``deliveries:{job_id}``: how many times a task for that job was started (redelivery cap);
    * ``alive``: a token the trainer writes at start; its absence later means Redis lost the
      run's data (restarted without persistence), so the trainer re-publishes and re-dispatches
      (one per trainer process, :meth:`alive_for`);
    * ``generation``: the id of the trainer's current start (rank 0 writes it, the other processes
      read it), which its jobs, policies and their trajectories and dead letters carry.
    """

    def __init__(self, run_id: str, prefix: str = DEFAULT_KEY_PREFIX) -> None:
        if not run_id or any(c in run_id for c in " :*?[]"):
            raise ValueError(f"run id {run_id!r} must be non-empty and contain no spaces, ':' or "
                             f"glob characters (it is part of Redis keys and blob paths).")
        self.run_id, self.prefix = run_id, prefix
        base = f"{prefix}:{run_id}"
        self.scored = f"{base}:scored"
        self.policy = f"{base}:policy"
        self.dead = f"{base}:dead"
        self.alive = f"{base}:alive"
        self.generation = f"{base}:generation"
        self.base = base

    def scored_for(self, rank: int) -> str:
        """The scored list of trainer process ``rank`` (rank 0: :attr:`scored`)."""
        return self.scored if rank == 0 else f"{self.scored}:r{rank}"

    def alive_for(self, rank: int) -> str:
        """The alive mark of trainer process ``rank`` (rank 0: :attr:`alive`)."""
        return self.alive if rank == 0 else f"{self.alive}:r{rank}"

    def deliveries(self, job_id: str) -> str:
        return f"{self.base}:deliveries:{job_id}"

    def pattern(self) -> str:
        """Glob matching every key of this run (for cleanup of this run only)."""
        return f"{self.base}:*"
