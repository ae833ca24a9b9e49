"""Faults injected for real into the distributed mode (tiny model, real Redis, real workers,
a real reward server under uvicorn), each run compared with what must hold afterwards:

* a sampler's pool process SIGKILLed mid-task: requeued (late ack + reject on worker lost),
  sampled again, every sample id used exactly once, final weights = the unfaulted run's;
* the reward server stopped for a while and restarted: the reward worker retries with
  backoff (logged), no score is invented, final weights = the unfaulted run's;
* a reward that always fails on one prompt (a poisoned sample): its task is retried, then
  dead-lettered with its sample ids; the trainer drops that prompt group from the epoch
  (``queue.on_dead_letter: drop_groups``), records it in ``dead_letters.jsonl`` and trains on
  the rest;
* the trainer SIGKILLed mid-epoch and restarted with ``--resume latest``: final weights = the
  unfaulted run's, every sample id in the ledger once.

One set of workers serves every test (module fixture); each test has its own run name. The
unfaulted reference is a distributed run of the same config without a fault. (The embedded run
differs slightly: reward workers score 8-bit images, the embedded trainer float ones.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.queue import RunState, delete_namespace_queues
from tests.helpers.procs import FLOWRL, ProcessGroup, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

EPOCHS, GROUPS, K = 3, 4, 4
CONFIG = "examples/toy/tiny_grpo.yaml"


def overrides(tmp_path: Path, run: str, reward_url: str, extra: list[str] = ()) -> list[str]:
    return [f"output_dir={tmp_path / 'runs'}", f"run_name={run}", "logging_backend=none",
            f"train.max_epochs={EPOCHS}", f"train.unique_sample_num_per_epoch={GROUPS}",
            f"train.group_size={K}", f"train.per_device_batch_size={K}",  # one group per job
            "train.gradient_step_per_epoch=1", "train.save_freq=1",
            "eval.eval_freq=0", "eval.num_prompts=2",
            f'rewards=[{{"name": "brightness", "reward_model": "remote", "url": "{reward_url}", '
            f'"protocol": "v2", "timeout": 5, "retries": 2, "backoff": 0.2}}]', *extra]


def as_args(items: list[str]) -> list[str]:
    return sum((["--set", o] for o in items), [])


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "final" / "lora" / "pytorch_lora_weights.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def ledger(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "scored_samples.jsonl").read_text().splitlines()]


class Cluster:
    """Reward server, two samplers, a reward worker on a private queue namespace."""

    def __init__(self, procs: ProcessGroup, tmp_path: Path, ns: str, port: int) -> None:
        self.procs, self.tmp_path, self.ns, self.port = procs, tmp_path, ns, port
        self.url = f"http://127.0.0.1:{port}"

    def start_reward_server(self) -> None:
        self.procs.start("reward-server", [sys.executable, "-m", "services.reward.cli", "--rewards",
                                           "brightness", "--port", str(self.port), "--log-level", "warning"])
        self.procs.wait_http("reward-server", f"{self.url}/v2/health/ready")

    def trainer(self, name: str, run: str, extra: list[str] = (), resume: bool = False):
        args = FLOWRL + ["trainer", CONFIG, *as_args(overrides(self.tmp_path, run, self.url, extra))]
        return self.procs.start(name, args + (["--resume", "latest"] if resume else []))

    def run_dir(self, run: str) -> Path:
        return self.tmp_path / "runs" / run


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_url):
    tmp_path = tmp_path_factory.mktemp("faults")
    ns = f"fault-{uuid.uuid4().hex[:8]}"
    env = {"FLOWRL_QUEUE_BROKER_URL": redis_url, "FLOWRL_QUEUE_NAMESPACE": ns, "FLOWRL_QUEUE_KEY_PREFIX": ns,
           "FLOWRL_QUEUE_STORE_URL": f"file://{tmp_path}/blobs", "FLOWRL_QUEUE_TASK_TIME_LIMIT_S": "200",
           "FLOWRL_QUEUE_COLLECT_TIMEOUT_S": "300", "FLOWRL_QUEUE_MAX_RETRIES": "4",
           "FLOWRL_QUEUE_RETRY_BACKOFF_S": "1", "OMP_NUM_THREADS": "1"}
    with ProcessGroup(tmp_path, env) as procs:
        c = Cluster(procs, tmp_path, ns, free_port())
        c.start_reward_server()
        procs.start("sampler-1", FLOWRL + ["worker", "sampler", "--name", f"s1-{ns}"])
        procs.start("sampler-2", FLOWRL + ["worker", "sampler", "--name", f"s2-{ns}"])
        procs.start("reward-worker", FLOWRL + ["worker", "reward", "--name", f"r1-{ns}"])
        for name in ("sampler-1", "sampler-2", "reward-worker"):
            procs.wait_log(name, "ready.")
        try:
            yield c
        finally:
            state = RunState.connect(redis_url, "x", ns)
            for run in ("clean", "sampler_kill", "reward_outage", "poison", "trainer_kill"):
                RunState(state.redis, run, ns).clear()
            delete_namespace_queues(state.redis, ns)


@pytest.fixture(scope="module")
def reference(cluster):
    """The unfaulted distributed run of the same config: its final LoRA."""
    trainer = cluster.trainer("trainer-clean", "clean")
    assert trainer.wait(timeout=400) == 0, cluster.procs.logs()
    check_complete(cluster.run_dir("clean"))
    return final_weights(cluster.run_dir("clean"))


def check_complete(run_dir: Path, expect_samples: int = EPOCHS * GROUPS * K) -> list[dict]:
    rows = ledger(run_dir)
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == len(set(ids)) == expect_samples  # every sample id used exactly once
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == EPOCHS and summary["policy_version"] == EPOCHS
    assert summary["samples"] == expect_samples
    return rows


def test_sampler_process_killed_mid_task(cluster, reference):
    procs = cluster.procs
    pattern = r"Task flowrl\.sample\[([0-9a-f-]+)\] (received|succeeded)"
    events = lambda: re.findall(pattern, procs.log("sampler-1"))  # noqa: E731
    before, lost_before = len(events()), procs.log("sampler-1").count("WorkerLostError")
    trainer = cluster.trainer("trainer-sampler-kill", "sampler_kill")
    deadline = time.monotonic() + 300
    # A toy task can finish in tens of milliseconds, so a kill may land between tasks (an idle
    # pool process, which Celery just replaces). Kill whenever sampler-1 holds a task that has
    # not succeeded, until one kill hits a running task (WorkerLostError).
    while procs.log("sampler-1").count("WorkerLostError") == lost_before:
        assert time.monotonic() < deadline and trainer.poll() is None, \
            "no kill landed on a running task before the run ended\n" + procs.logs()
        seen = events()[before:]
        running = {i for i, e in seen if e == "received"} - {i for i, e in seen if e == "succeeded"}
        if running:
            for child in children(procs.procs["sampler-1"].pid):  # the pool process
                os.kill(child, signal.SIGKILL)
            time.sleep(1.0)  # Celery notices the lost process and requeues its task
        time.sleep(0.005)
    assert trainer.wait(timeout=400) == 0, procs.logs()

    logs = procs.log("sampler-1") + procs.log("sampler-2")
    received = re.findall(r"Task flowrl\.sample\[([0-9a-f-]+)\] received", logs)
    redelivered = {i for i in received if received.count(i) > 1}
    assert redelivered, logs[-3000:]  # the lost task was delivered again ...
    for lost in redelivered:
        assert f"Task flowrl.sample[{lost}] succeeded" in logs  # ... and done
    check_complete(cluster.run_dir("sampler_kill"))
    assert max_diff(final_weights(cluster.run_dir("sampler_kill")), reference) < 1e-6


def test_reward_server_down_then_back(cluster, reference):
    procs = cluster.procs
    before = procs.log("reward-worker").count("] received")
    trainer = cluster.trainer("trainer-reward-outage", "reward_outage")
    deadline = time.monotonic() + 300
    while procs.log("reward-worker").count("] received") == before:
        assert time.monotonic() < deadline and trainer.poll() is None, procs.logs()
        time.sleep(0.05)
    procs.stop("reward-server")  # down while the worker is scoring
    time.sleep(6)
    cluster.start_reward_server()
    assert trainer.wait(timeout=400) == 0, procs.logs()

    worker_log = procs.log("reward-worker")
    assert re.search(r"flowrl\.reward .*(unreachable|connect|Connect).*; retry 1/4", worker_log), worker_log[-3000:]
    rows = check_complete(cluster.run_dir("reward_outage"))
    assert all(r["rewards"]["brightness"] is not None for r in rows)  # nothing silently scored
    assert max_diff(final_weights(cluster.run_dir("reward_outage")), reference) < 1e-6


def test_poisoned_sample_is_dead_lettered_and_its_group_dropped(cluster):
    poisoned = ('rewards=[{"name": "brightness", "reward_model": '
                '"tests.helpers.rewards.PoisonedBrightness", "poison": "triangle"}]')
    trainer = cluster.trainer("trainer-poison", "poison", [poisoned])
    assert trainer.wait(timeout=400) == 0, cluster.procs.logs()

    run = cluster.run_dir("poison")
    letters = [json.loads(x) for x in (run / "dead_letters.jsonl").read_text().splitlines()]
    assert letters, "no group was poisoned: pick a poison word that the run's prompts contain"
    rows = ledger(run)
    used = {r["sample_id"] for r in rows}
    dropped = {sid for letter in letters for sid in letter["dropped_samples"]}
    for letter in letters:
        assert letter["task"] == "flowrl.reward" and letter["attempts"] == 5  # 1 + max_retries 4
        assert "poisoned prompt" in letter["error"] and "triangle" in letter["error"]
        assert letter["lost"] and set(letter["lost"]) <= set(letter["dropped_samples"])
    assert not used & dropped  # dropped samples were not trained on
    assert len(used) == len(rows) == EPOCHS * GROUPS * K - len(dropped)
    log = cluster.procs.log("trainer-poison")
    assert "dead-lettered after 5 attempt(s)" in log and "Dropping prompt group(s)" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == EPOCHS and summary["samples"] == len(used)


def test_trainer_killed_mid_epoch_resumes_from_checkpoint(cluster, reference):
    procs = cluster.procs
    trainer = cluster.trainer("trainer-kill-1", "trainer_kill")
    ckpt = cluster.run_dir("trainer_kill") / "checkpoints" / "checkpoint-1"
    deadline = time.monotonic() + 300
    received = lambda: procs.log("sampler-1").count("received") + procs.log("sampler-2").count("received")  # noqa: E731
    while not ckpt.is_dir():
        assert time.monotonic() < deadline and trainer.poll() is None, procs.logs()
        time.sleep(0.005)
    dispatched = received()
    while received() == dispatched:  # epoch 2 is being sampled (a fast machine runs an epoch in ~0.5 s)
        assert time.monotonic() < deadline and trainer.poll() is None, procs.logs()
        time.sleep(0.005)
    procs.stop("trainer-kill-1", signal.SIGKILL)
    assert not (ckpt.parent / "final").exists(), "the run ended before it could be killed"

    again = cluster.trainer("trainer-kill-2", "trainer_kill", resume=True)
    assert again.wait(timeout=400) == 0, procs.logs()
    assert "resumed from" in procs.log("trainer-kill-2")
    rows = check_complete(cluster.run_dir("trainer_kill"))
    assert sorted({r["epoch"] for r in rows}) == list(range(EPOCHS))
    assert max_diff(final_weights(cluster.run_dir("trainer_kill")), reference) < 1e-6


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    """A private redis-server without persistence: a restart loses everything in it."""
    import redis

    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            if redis.Redis(port=port, socket_connect_timeout=1).ping():
                return proc
        except redis.RedisError:
            assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)


def test_redis_restarted_without_persistence_is_detected_and_recovered(cluster, reference, tmp_path):
    """Redis SIGKILLed and restarted empty mid-run: the trainer waits (logged), sees its alive
    mark gone, re-publishes the policy and re-dispatches the jobs not fully scored; duplicates
    of tasks that did survive are dropped by sample id, so the run equals the unfaulted one."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port, tmp_path)
    env = {"FLOWRL_QUEUE_BROKER_URL": url, "FLOWRL_QUEUE_NAMESPACE": "r", "FLOWRL_QUEUE_KEY_PREFIX": "r",
           "FLOWRL_QUEUE_STORE_URL": f"file://{tmp_path}/blobs", "FLOWRL_QUEUE_TASK_TIME_LIMIT_S": "200",
           "FLOWRL_QUEUE_COLLECT_TIMEOUT_S": "300", "FLOWRL_QUEUE_POLICY_WAIT_S": "300",
           "OMP_NUM_THREADS": "1"}
    try:
        with ProcessGroup(tmp_path, env) as procs:
            procs.start("sampler", FLOWRL + ["worker", "sampler", "--name", "s-redis"])
            procs.start("reward-worker", FLOWRL + ["worker", "reward", "--name", "r-redis"])
            for name in ("sampler", "reward-worker"):
                procs.wait_log(name, "ready.")
            args = overrides(tmp_path, "redis_restart", cluster.url)
            trainer = procs.start("trainer", FLOWRL + ["trainer", CONFIG, *as_args(args)])
            ckpt = tmp_path / "runs" / "redis_restart" / "checkpoints" / "checkpoint-1"
            deadline = time.monotonic() + 300
            while not ckpt.is_dir():
                assert time.monotonic() < deadline and trainer.poll() is None, procs.logs()
                time.sleep(0.005)
            dispatched = procs.log("sampler").count("received")
            while procs.log("sampler").count("received") == dispatched:  # epoch 2's job is out (a fast
                assert time.monotonic() < deadline and trainer.poll() is None, procs.logs()  # machine
                time.sleep(0.005)  # sends it ~0.3 s after checkpoint-1; a kill before that loses no job)
            server.kill()  # epoch 2 in flight
            server.wait(timeout=10)
            time.sleep(3)
            server = start_redis(port, tmp_path)
            assert trainer.wait(timeout=400) == 0, procs.logs()
            log = procs.log("trainer")
    finally:
        server.kill()
        server.wait(timeout=10)
    assert "unreachable" in log and "Redis is back" in log, log[-3000:]
    assert re.search(r"Redis lost run redis_restart's data .* re-dispatched [1-9]\d* job", log), log[-3000:]
    check_complete(tmp_path / "runs" / "redis_restart")
    assert max_diff(final_weights(tmp_path / "runs" / "redis_restart"), reference) < 1e-6
