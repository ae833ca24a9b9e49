"""A task that outlives ``queue.task_time_limit_s`` is dead-lettered, so the trainer hears of it: at the
hard limit Celery kills the task and acknowledges its message (task_acks_on_failure_or_timeout), and the
task was lost without a word (the trainer waited queue.collect_timeout_s, then blamed the workers). The
soft limit, below the hard one, raises inside the task first."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shared.queue import RunState, delete_namespace_queues, worker_argv

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_a_task_past_its_time_limit_is_dead_lettered(redis_url, tmp_path):
    import redis

    ns = f"slow{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "SLOW_TASK_BROKER": redis_url, "SLOW_TASK_NS": ns, "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tests.helpers.slow_task_app", *worker_argv(
        f"{ns}.sample", f"{ns}@test", "INFO")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis.from_url(redis_url)
    state = RunState.connect(redis_url, "run", ns)
    try:
        os.environ.update(SLOW_TASK_BROKER=redis_url, SLOW_TASK_NS=ns)
        sys.modules.pop("tests.helpers.slow_task_app", None)
        from tests.helpers.slow_task_app import app

        app.send_task("slow.task", args=['{"job_id": "run/e0/j0", "run_id": "run"}'], queue=f"{ns}.sample")
        deadline = time.monotonic() + 60
        while not state.dead_letters() and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.2)
        letters = state.dead_letters()
        assert letters, (tmp_path / "worker.log").read_text()[-3000:]
        assert letters[0].job_id == "run/e0/j0" and letters[0].sample_ids == ["run/e0/g0/k0"]
        assert "SoftTimeLimitExceeded" in letters[0].error, letters[0].error
    finally:
        worker.terminate()
        worker.wait(30)
        state.clear()
        delete_namespace_queues(client, ns)
        for key in ("SLOW_TASK_BROKER", "SLOW_TASK_NS"):
            os.environ.pop(key, None)
        sys.modules.pop("tests.helpers.slow_task_app", None)
