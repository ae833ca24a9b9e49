"""A Celery app whose one guarded task runs longer than ``queue.task_time_limit_s`` (3 s), for
tests/integration/test_task_time_limit.py; broker and namespace come from ``SLOW_TASK_BROKER`` /
``SLOW_TASK_NS``."""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from shared.queue import QueueSettings, make_celery
from shared.tasks import guarded_task

NS = os.environ.get("SLOW_TASK_NS", "slowtask")
settings = QueueSettings(broker_url=os.environ.get("SLOW_TASK_BROKER", "redis://127.0.0.1:6379/15"),
                         namespace=NS, key_prefix=NS, task_time_limit_s=3.0)
app = make_celery(settings, name="slow")


class Message(BaseModel):
    job_id: str
    run_id: str


def body(task, message: Message, state, attempt: int) -> None:
    time.sleep(30)  # a job far slower than the limit (a hung GPU kernel, say)


slow = guarded_task(app, settings, "slow.task", Message, body, job_id=lambda m: m.job_id,
                    sample_ids=lambda m: ["run/e0/g0/k0"], run_id=lambda m: (m.run_id, NS))
