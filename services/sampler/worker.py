"""The sampler's Celery worker: task :data:`~shared.protocol.TASK_SAMPLE` on queue ``sample``.

Start one process per GPU (``flowrl worker sampler``, which pins ``--concurrency 1``)::

    FLOWRL_QUEUE_BROKER_URL=redis://redis:6379/0 CUDA_VISIBLE_DEVICES=0 flowrl worker sampler

The task runs the job (:class:`~services.sampler.runtime.SamplerRuntime`), then enqueues a
:class:`~shared.protocol.RewardJob` for the reward queue. Failure handling, in order:

* a start beyond ``queue.max_deliveries`` of the same attempt (the task keeps killing its
  worker) is dead-lettered and acknowledged;
* transient errors (connection, I/O, a policy version not yet published) are retried with
  exponential backoff up to ``queue.max_retries`` times, then dead-lettered;
* any other error (bad job, wrong model) is dead-lettered at once with the message.
A dead letter is a :class:`~shared.protocol.DeadLetter` in the run's Redis list, which the
trainer reads and reports: nothing fails silently.
"""

from __future__ import annotations

import logging
import os

from shared.protocol import QUEUE_REWARD, TASK_REWARD, TASK_SAMPLE, RewardJob, SampleJob
from shared.queue import from_environment, make_celery
from shared.tasks import guarded_task

log = logging.getLogger("flowrl.sampler")
settings = from_environment()  # a bad FLOWRL_QUEUE_* value: an error naming it
app = make_celery(settings, name="flowrl-sampler")
_runtime = None


def runtime():
    """The process's :class:`SamplerRuntime`, created on first use (after fork)."""
    global _runtime
    if _runtime is None:
        from services.sampler.runtime import SamplerRuntime

        _runtime = SamplerRuntime(policy_wait_s=settings.policy_wait_s,
                                  name=os.environ.get("FLOWRL_WORKER_NAME") or None)
    return _runtime


def _sample(task, job: SampleJob, state, attempt: int) -> None:
    from services.sampler.app import observe_job
    from services.sampler.runtime import StaleJob

    try:
        trajectory = runtime().run(job, state, attempt=attempt)
    except StaleJob as e:  # a dead trainer's job: acknowledged, nothing sampled
        log.warning("%s", e)
        return
    observe_job(len(trajectory.sample_ids), trajectory.seconds, trajectory.policy_version)
    reward_job = RewardJob(trajectory=trajectory, rewards=job.rewards, key_prefix=job.key_prefix)
    task.app.send_task(TASK_REWARD, args=[reward_job.model_dump_json()],
                       queue=settings.queue(QUEUE_REWARD))


def _dead_letter() -> None:
    from services.sampler.app import observe_dead_letter

    observe_dead_letter()


sample = guarded_task(app, settings, TASK_SAMPLE, SampleJob, _sample,
                      job_id=lambda j: j.job_id, sample_ids=lambda j: [i.sample_id for i in j.items],
                      generation=lambda j: j.generation,
                      run_id=lambda j: (j.run_id, j.key_prefix), on_dead_letter=_dead_letter)
