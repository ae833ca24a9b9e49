"""A queue worker's admin routes on its HTTP side (``flowrl worker reward --http-port``): drain stops it
taking tasks (they wait in the queue), resume takes them again, status says which; with a token the
admin routes need it and liveness stays open. A real worker process, real Redis."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from shared.protocol import QUEUE_REWARD, TASK_REWARD
from shared.queue import QueueSettings, delete_namespace_queues, make_celery
from tests.helpers.procs import FLOWRL, ProcessGroup, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_drain_and_resume_a_reward_worker(tmp_path, redis_url):
    ns = f"test-{uuid.uuid4().hex[:8]}"
    env = {"FLOWRL_QUEUE_BROKER_URL": redis_url, "FLOWRL_QUEUE_NAMESPACE": ns, "FLOWRL_QUEUE_KEY_PREFIX": ns,
           "FLOWRL_API_TOKEN": "s3cret", "OMP_NUM_THREADS": "1"}
    port, name = free_port(), f"r-{ns}@localhost"
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer s3cret"}
    settings = QueueSettings(broker_url=redis_url, namespace=ns, key_prefix=ns)
    queue = settings.queue(QUEUE_REWARD)
    app = make_celery(settings, name="admin-test")
    client = app.broker_connection().default_channel.client  # the broker's Redis, as kombu uses it
    try:
        with ProcessGroup(tmp_path, env) as procs:
            procs.start("worker", FLOWRL + ["worker", "reward", "--name", name, "--http-port", str(port)])
            procs.wait_http("worker", f"{base}/health/live")
            procs.wait_log("worker", "ready.")
            assert httpx.get(f"{base}/admin/status").status_code == 401  # the token guards admin...
            assert httpx.get(f"{base}/health/live").status_code == 200  # ...not liveness
            status = httpx.get(f"{base}/admin/status", headers=auth, timeout=30).json()
            assert status == {"worker": name, "queue": queue, "consuming": True, "active_tasks": []}

            drained = httpx.post(f"{base}/admin/drain", headers=auth, timeout=30)
            assert drained.status_code == 200 and drained.json()["consuming"] is False
            # a task sent now waits in the queue (a malformed one: the worker dead-letters it when it takes it)
            app.send_task(TASK_REWARD, args=['{"not": "a job"}'], queue=queue)
            time.sleep(3)
            assert client.llen(queue) == 1, "a drained worker took a task"

            resumed = httpx.post(f"{base}/admin/resume", headers=auth, timeout=30)
            assert resumed.status_code == 200 and resumed.json()["consuming"] is True
            deadline = time.monotonic() + 60
            while client.llen(queue) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert client.llen(queue) == 0, "the resumed worker did not take the waiting task\n" + procs.logs()
    finally:
        delete_namespace_queues(client, ns)
