"""Faults injected for real into the distributed mode (tiny model, real Redis and workers).

* a sampler's pool process is SIGKILLed while it runs a task: the task is requeued (late ack +
  reject on worker lost), another process samples it, and the run completes with every sample
  id used exactly once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid

import pytest

from shared.queue import RunState, delete_namespace_queues
from tests.helpers.procs import FLOWRL, ProcessGroup

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

EPOCHS, GROUPS, K = 3, 4, 4


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_sampler_process_killed_mid_task_loses_nothing(tmp_path, redis_url):
    ns = f"fault-{uuid.uuid4().hex[:8]}"
    env = {"FLOWRL_QUEUE_BROKER_URL": redis_url, "FLOWRL_QUEUE_NAMESPACE": ns, "FLOWRL_QUEUE_KEY_PREFIX": ns,
           "FLOWRL_QUEUE_STORE_URL": f"file://{tmp_path}/blobs", "FLOWRL_QUEUE_TASK_TIME_LIMIT_S": "200",
           "FLOWRL_QUEUE_COLLECT_TIMEOUT_S": "300", "OMP_NUM_THREADS": "1"}
    overrides = [f"output_dir={tmp_path / 'runs'}", "run_name=fault", "logging_backend=none",
                 f"train.max_epochs={EPOCHS}", f"train.unique_sample_num_per_epoch={GROUPS}",
                 f"train.group_size={K}", "train.per_device_batch_size=8", "train.gradient_step_per_epoch=1",
                 "eval.eval_freq=0", "eval.num_prompts=2"]
    try:
        with ProcessGroup(tmp_path, env) as procs:
            victim = procs.start("sampler-1", FLOWRL + ["worker", "sampler", "--name", f"s1-{ns}"])
            procs.start("sampler-2", FLOWRL + ["worker", "sampler", "--name", f"s2-{ns}"])
            procs.start("reward-worker", FLOWRL + ["worker", "reward", "--name", f"r1-{ns}"])
            for name in ("sampler-1", "sampler-2", "reward-worker"):
                procs.wait_log(name, "ready.")
            trainer = procs.start("trainer", FLOWRL + ["trainer", "examples/toy/tiny_grpo.yaml",
                                                       *sum((["--set", o] for o in overrides), [])])
            # kill sampler-1's pool process as soon as it has taken its first task
            procs.wait_log("sampler-1", "Task flowrl.sample[", timeout=300)
            (child,) = children(victim.pid)
            os.kill(child, signal.SIGKILL)
            killed_at = time.monotonic()
            assert trainer.wait(timeout=500) == 0, procs.logs()
            logs = procs.log("sampler-1") + procs.log("sampler-2")
    finally:
        state = RunState.connect(redis_url, "fault", ns)
        state.clear()
        delete_namespace_queues(state.redis, ns)

    # the killed task was lost by its process, requeued, and then done (by either sampler)
    assert "WorkerLostError" in logs, logs[-3000:]
    task = re.search(r"Task flowrl\.sample\[([0-9a-f-]+)\] received", logs).group(1)
    assert logs.count(f"Task flowrl.sample[{task}] received") == 2, logs[-3000:]
    assert f"Task flowrl.sample[{task}] succeeded" in logs
    run = tmp_path / "runs" / "fault"
    ledger = [json.loads(line) for line in (run / "scored_samples.jsonl").read_text().splitlines()]
    ids = [row["sample_id"] for row in ledger]
    assert len(ids) == len(set(ids)) == EPOCHS * GROUPS * K
    summary = json.loads((run / "summary.json").read_text())
    assert summary["samples"] == EPOCHS * GROUPS * K and summary["policy_version"] == EPOCHS
    assert time.monotonic() - killed_at < 400
