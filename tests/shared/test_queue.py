"""The Celery profile, queue settings and the run state in a real Redis."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from shared.config import parse_config
from shared.protocol import BlobRef, DeadLetter, PolicyPublished, ScoredBatch, Trajectory
from shared.queue import (QueueSettings, RunState, celery_config, delete_namespace_queues, export_settings,
                          retry_delay)

REF = BlobRef(uri="memory://s/a", sha256="0" * 64, nbytes=3)


def test_profile_is_json_only_late_ack_prefetch_one():
    conf = celery_config(QueueSettings(task_time_limit_s=100, namespace="lab"))
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_transport_options"]["visibility_timeout"] == 200 > conf["task_time_limit"]
    assert conf["task_routes"]["flowrl.sample"] == {"queue": "lab.sample"}
    assert conf["task_routes"]["flowrl.reward"] == {"queue": "lab.reward"}


def test_visibility_timeout_must_exceed_the_task_limit():
    with pytest.raises(ValidationError, match="redelivers a task that is still running"):
        QueueSettings(task_time_limit_s=100, visibility_timeout_s=50)


def test_environment_fills_in_and_yaml_wins(monkeypatch):
    monkeypatch.setenv("FLOWRL_QUEUE_BROKER_URL", "redis://from-env:6379/3")
    monkeypatch.setenv("FLOWRL_QUEUE_MAX_RETRIES", "7")
    cfg = parse_config({"rewards": [{"reward_model": "brightness"}], "queue": {"max_retries": 1}})
    assert cfg.queue.broker_url == "redis://from-env:6379/3" and cfg.queue.max_retries == 1
    env = export_settings(cfg.queue)
    assert env["FLOWRL_QUEUE_MAX_RETRIES"] == "1" and "FLOWRL_QUEUE_STORE_URL" not in env


def test_a_bad_queue_variable_is_named(monkeypatch, capsys):
    """A stale FLOWRL_QUEUE_* value was reported as the YAML's key `broker_url` (even for a local run),
    and a worker died on it with a pydantic traceback."""
    from shared.config import ConfigError
    from trainer.cli import main

    monkeypatch.setenv("FLOWRL_QUEUE_BROKER_URL", "http://x")
    for queue in ({}, {"queue": {"max_retries": 1}}):  # without a queue: section, and with one
        with pytest.raises(ConfigError, match=r"environment variable FLOWRL_QUEUE_BROKER_URL='http://x'.*Redis URL"):
            parse_config({"rewards": [{"reward_model": "brightness"}], **queue})
    assert parse_config({"rewards": [{"reward_model": "brightness"}],
                         "queue": {"broker_url": "redis://h:6379/0"}}).queue.broker_url == "redis://h:6379/0"
    monkeypatch.setenv("FLOWRL_WORKER_NAME", "unset-by-test")
    import sys
    for name in ("services.reward.worker",):
        monkeypatch.delitem(sys.modules, name, raising=False)  # imported anew: it reads the variable
    assert main(["worker", "reward", "--name", "env-test"]) == 2
    assert "FLOWRL_QUEUE_BROKER_URL='http://x'" in capsys.readouterr().err


def test_retry_delay_doubles_and_caps():
    assert [retry_delay(a, 1.0) for a in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


@pytest.fixture
def state(redis_url):
    s = RunState.connect(redis_url, "run1", f"test-{uuid.uuid4().hex[:8]}")
    yield s
    s.clear()


def traj() -> Trajectory:
    return Trajectory(run_id="run1", job_id="run1/e0/j0", epoch=0, policy_version=0,
                      sample_ids=["a", "b"], group_ids=[0, 0], prompts=["p", "p"], sde_steps=[],
                      store_url="memory://s", tensors=REF, images=REF)


def test_run_state_round_trips_in_redis(state):
    assert state.pop_scored(timeout=0.05) is None and state.policy() is None
    batch = ScoredBatch(trajectory=traj(), rewards={"r": [0.1, None]})
    state.push_scored(batch)
    assert state.pop_scored(timeout=1) == batch
    for v in (0, 1):
        state.publish(PolicyPublished(run_id="run1", version=v, weights=REF, finetune_type="lora",
                                      published_at=0.0))
    assert state.policy().version == 1
    letter = DeadLetter(run_id="run1", task="t", job_id="j", sample_ids=["a"], error="x", attempts=3)
    state.dead_letter(letter)
    state.dead_letter(letter)
    assert state.dead_letters() == [letter, letter] and state.dead_letters(1) == [letter]
    assert [state.count_delivery("j:r0") for _ in range(3)] == [1, 2, 3]


def test_clear_deletes_only_this_runs_keys(state):
    other = RunState(state.redis, "run2", state.keys.prefix)
    state.redis.set("unrelated-key-" + state.keys.prefix, "keep")
    try:
        state.count_delivery("j")
        other.count_delivery("j")
        assert state.clear() == 1
        assert other.count_delivery("j") == 2
        assert state.redis.get("unrelated-key-" + state.keys.prefix) == b"keep"
    finally:
        other.clear()
        state.redis.delete("unrelated-key-" + state.keys.prefix)


def test_namespace_cleanup_touches_only_that_namespace(state):
    r, ns = state.redis, state.keys.prefix
    r.rpush(f"{ns}.sample", "x")
    r.set(f"_kombu.binding.{ns}.sample", "x")
    r.set(f"{ns}x.sample", "keep")  # another namespace that merely starts the same
    try:
        assert delete_namespace_queues(r, ns) == 2
        assert r.get(f"{ns}x.sample") == b"keep"
        with pytest.raises(ValueError, match="empty"):
            delete_namespace_queues(r, "")
    finally:
        r.delete(f"{ns}x.sample")
