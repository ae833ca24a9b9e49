"""The Celery + Redis profile of the distributed mode, and the Redis-side run state.

One function builds the Celery app every process uses (trainer, sampler workers, reward
workers), so the reliability settings cannot drift apart:

* JSON only (``task_serializer``/``accept_content``): no pickle on the wire;
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a task is acknowledged after it ran, and a
  worker that dies mid-task gets it redelivered instead of losing it;
* ``worker_prefetch_multiplier = 1``: a GPU worker holds one task at a time, so a dead worker
  strands at most one task;
* the Redis ``visibility_timeout`` is set above the longest task (``task_time_limit``): an
  unacknowledged task is redelivered only when its worker is really gone;
* no result backend: results travel as messages (:class:`~shared.protocol.ScoredBatch` pushed
  to the run's Redis list), tasks are idempotent by deterministic sample id.

:class:`RunState` wraps the run's Redis keys (:class:`~shared.protocol.RunKeys`): the scored
list, the published policy and the dead letters.
"""

from __future__ import annotations

import time
from typing import Literal, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.protocol import (QUEUE_REWARD, QUEUE_SAMPLE, TASK_REWARD, TASK_SAMPLE, DeadLetter,
                             PolicyPublished, RunKeys, ScoredBatch)


REDIS_SCHEMES = ("redis", "rediss", "unix")
CERT_REQS = ("required", "optional", "none")


def check_redis_url(url: str) -> str:
    """A broker URL both redis-py (the run state) and Celery read the same way, or a ValueError.

    ``redis://[[user]:password@]host:port/db`` (password: Redis AUTH / ACL), ``rediss://`` for TLS,
    ``unix:///path/redis.sock``. A ``rediss://`` URL without ``ssl_cert_reqs`` gets
    ``ssl_cert_reqs=required``: Celery (kombu) would otherwise skip certificate verification
    while redis-py enforces it. Add ``ssl_ca_certs=/path/ca.pem`` for a private CA.
    """
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError(
            f"queue.broker_url must be a Redis URL, got scheme {parts.scheme!r}. Fix: "
            f"redis://[:PASSWORD@]HOST:6379/0, or rediss://...  for TLS (flowrl's queue and run state are Redis)")
    if parts.scheme != "rediss":
        return url
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    reqs = query.get("ssl_cert_reqs")
    if reqs is None:
        return urlunsplit(parts._replace(query="&".join(filter(None, [parts.query, "ssl_cert_reqs=required"]))))
    if reqs not in CERT_REQS:
        raise ValueError(
            f"queue.broker_url: ssl_cert_reqs={reqs!r} is not understood by redis-py. Fix: use one of "
            f"{', '.join(CERT_REQS)} (lower case); 'required' verifies the server certificate")
    return url


class QueueSettings(BaseSettings):
    """``queue:`` of the experiment config; every field also from ``FLOWRL_QUEUE_<NAME>``.

    YAML values win over the environment, the environment over the defaults.
    """

    model_config = SettingsConfigDict(env_prefix="FLOWRL_QUEUE_", extra="forbid")

    broker_url: str = "redis://127.0.0.1:6379/0"  # Celery broker AND the run-state Redis
    store_url: str | None = None  # blob store; None = file://{output_dir}/blobs
    key_prefix: str = "flowrl"
    namespace: str = ""  # queue-name prefix: separate worker pools (or tests) on one Redis
    task_time_limit_s: float = Field(1800.0, gt=0)  # hard limit of one sample / reward task
    visibility_timeout_s: float | None = Field(None, gt=0)  # None = 2 x task_time_limit_s
    max_retries: int = Field(3, ge=0)  # retries of a transient failure, with backoff
    retry_backoff_s: float = Field(2.0, ge=0)  # first retry delay; doubles, capped at 60 s
    max_deliveries: int = Field(3, ge=1)  # starts of one task (redeliveries after worker death)
    collect_timeout_s: float = Field(3600.0, gt=0)  # trainer gives up waiting for an epoch
    policy_wait_s: float = Field(600.0, gt=0)  # sampler gives up waiting for a policy version
    # a dead-lettered task's samples: drop their whole prompt groups from the epoch and train
    # on the rest (logged with the sample ids, kept in dead_letters.jsonl), or stop the run
    on_dead_letter: Literal["drop_groups", "stop"] = "drop_groups"
    # how long the trainer waits for an unreachable Redis (logged) before it stops the run
    redis_outage_s: float = Field(300.0, gt=0)

    @field_validator("broker_url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        return check_redis_url(url)

    @model_validator(mode="after")
    def _visibility_above_time_limit(self) -> "QueueSettings":
        if self.visibility_timeout_s is not None and self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError(
                f"queue.visibility_timeout_s={self.visibility_timeout_s} must exceed "
                f"queue.task_time_limit_s={self.task_time_limit_s}: otherwise Redis redelivers a "
                f"task that is still running. Fix: raise it or leave it unset (2 x the limit).")
        return self

    @property
    def visibility_timeout(self) -> float:
        return self.visibility_timeout_s or 2 * self.task_time_limit_s

    def queue(self, name: str) -> str:
        """The broker queue for ``name`` (``sample`` / ``reward``) in this namespace."""
        return f"{self.namespace}.{name}" if self.namespace else name


class QueueEnvironmentError(ValueError):
    """A ``FLOWRL_QUEUE_*`` environment variable holds a value :class:`QueueSettings` refuses."""


def environment_problem(field: str, msg: str, given=()) -> str | None:
    """The line naming ``FLOWRL_QUEUE_<FIELD>`` when that variable, not ``given`` (the YAML's
    ``queue:`` keys), supplied the value pydantic refused with ``msg``; None otherwise."""
    import os

    var = f"FLOWRL_QUEUE_{field.upper()}"
    if not field or field in given or var not in os.environ:
        return None
    msg = msg[:1].lower() + msg[1:]  # (only the first letter: allowed values keep their case)
    fix = "Or" if "Fix:" in msg else "Fix:"
    return (f"environment variable {var}={os.environ[var]!r}: {msg}. {fix} correct or unset it "
            f"(queue.{field} in the experiment's YAML wins over it).")


def from_environment(**given: Any) -> QueueSettings:
    """:class:`QueueSettings` from ``given`` and the environment; a bad value that came from a
    ``FLOWRL_QUEUE_*`` variable is a :class:`QueueEnvironmentError` naming the variable (pydantic named
    only the field, so the message blamed the experiment's YAML, or a worker printed a traceback)."""
    from pydantic import ValidationError

    try:
        return QueueSettings(**given)
    except ValidationError as err:
        lines = [line for e in err.errors()
                 if (line := environment_problem(str(e["loc"][0]) if e["loc"] else "", e["msg"], given))]
        if not lines:
            raise
        raise QueueEnvironmentError("\n".join(lines)) from None


def celery_config(settings: QueueSettings) -> dict[str, Any]:
    """The Celery settings every flowrl process uses (see the module docstring)."""
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,  # failures are dead-lettered by the task itself
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_time_limit": settings.task_time_limit_s,
        # before the hard limit kills the task (and Celery acks it: lost without a word), the soft one raises
        # SoftTimeLimitExceeded inside it, which guarded_task dead-letters: the trainer hears of it
        "task_soft_time_limit": max(settings.task_time_limit_s - 60, 0.9 * settings.task_time_limit_s),
        "task_routes": {TASK_SAMPLE: {"queue": settings.queue(QUEUE_SAMPLE)},
                        TASK_REWARD: {"queue": settings.queue(QUEUE_REWARD)}},
        "task_default_queue": settings.queue(QUEUE_SAMPLE),
        "worker_hijack_root_logger": False,
    }


def make_celery(settings: QueueSettings, name: str = "flowrl"):
    from celery import Celery

    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (what a health answer may show)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def retry_delay(attempt: int, base: float) -> float:
    """Exponential backoff: ``base * 2**attempt`` seconds, capped at 60."""
    return min(60.0, base * (2 ** attempt))


class RunState:
    """The run's Redis keys: scored batches, the published policy, dead letters, deliveries.

    ``rank``: the trainer process this state pops scored batches and keeps its alive mark for
    (several trainer processes under ``accelerate launch`` each have their own list); reward
    workers push each batch to the list of the rank its trajectory names."""

    def __init__(self, redis_client, run_id: str, prefix: str = "flowrl", rank: int = 0) -> None:
        self.redis = redis_client
        self.keys = RunKeys(run_id, prefix)
        self.rank = rank

    @classmethod
    def connect(cls, url: str, run_id: str, prefix: str = "flowrl", rank: int = 0) -> "RunState":
        import redis

        return cls(redis.Redis.from_url(url), run_id, prefix, rank)

    # -- scored batches (reward workers push, the trainer pops)
    def push_scored(self, batch: ScoredBatch) -> None:
        self.redis.rpush(self.keys.scored_for(batch.trajectory.trainer_rank), batch.model_dump_json())

    def pop_scored(self, timeout: float) -> ScoredBatch | None:
        """The oldest scored batch, waiting up to ``timeout`` seconds (None if none came).

        Blocks in slices of at most 2 s: redis-py's socket timeout (5 s by default) would
        otherwise cut a longer BLPOP short with an error."""
        deadline = time.monotonic() + timeout
        while True:
            wait = min(2.0, max(deadline - time.monotonic(), 0.01))
            item = self.redis.blpop([self.keys.scored_for(self.rank)], timeout=wait)
            if item is not None:
                return ScoredBatch.model_validate_json(item[1])
            if time.monotonic() >= deadline:
                return None

    # -- policy versions (the trainer publishes, samplers read)
    def publish(self, message: PolicyPublished) -> None:
        self.redis.set(self.keys.policy, message.model_dump_json())

    def policy(self) -> PolicyPublished | None:
        raw = self.redis.get(self.keys.policy)
        return None if raw is None else PolicyPublished.model_validate_json(raw)

    # -- dead letters and deliveries
    def dead_letter(self, letter: DeadLetter) -> None:
        self.redis.rpush(self.keys.dead, letter.model_dump_json())

    def dead_letters(self, start: int = 0) -> list[DeadLetter]:
        return [DeadLetter.model_validate_json(x) for x in self.redis.lrange(self.keys.dead, start, -1)]

    def count_delivery(self, job_id: str) -> int:
        """Count one more start of the task for ``job_id``; returns the count (1 = first)."""
        key = self.keys.deliveries(job_id)
        n = int(self.redis.incr(key))
        self.redis.expire(key, 7 * 24 * 3600)
        return n

    # -- the trainer's start (see RunKeys.generation)
    def set_generation(self, generation: str) -> None:
        self.redis.set(self.keys.generation, generation)

    def generation(self) -> str:
        raw = self.redis.get(self.keys.generation)
        return "" if raw is None else raw.decode()

    # -- data-loss detection (see RunKeys.alive)
    def mark(self, token: str) -> None:
        self.redis.set(self.keys.alive_for(self.rank), token)

    def marked(self, token: str) -> bool:
        value = self.redis.get(self.keys.alive_for(self.rank))
        return value is not None and value.decode() == token

    def clear(self) -> int:
        """Delete this run's keys only (never anything else in the database)."""
        keys = list(self.redis.scan_iter(match=self.keys.pattern(), count=500))
        return int(self.redis.delete(*keys)) if keys else 0


def export_settings(settings: QueueSettings) -> dict[str, str]:
    """``FLOWRL_QUEUE_*`` environment variables that reproduce ``settings`` (for workers started
    from a config file: the worker modules read their settings from the environment)."""
    out = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            out[f"FLOWRL_QUEUE_{name.upper()}"] = str(value)
    return out


def delete_namespace_queues(redis_client, namespace: str) -> int:
    """Delete the Celery queues (and kombu's bindings) of ``namespace`` only: what a test or a
    finished experiment created, never another namespace's keys. Returns keys deleted."""
    if not namespace:
        raise ValueError("refusing to delete the default (empty) namespace's queues")
    keys = []
    for pattern in (f"{namespace}.*", f"_kombu.binding.{namespace}.*", f"_kombu.binding_permanent.{namespace}.*"):
        keys += list(redis_client.scan_iter(match=pattern, count=500))
    return int(redis_client.delete(*keys)) if keys else 0


def worker_argv(queue: str, name: str, loglevel: str = "INFO") -> list[str]:
    """Celery worker arguments of the profile: one process that takes one task at a time
    (one GPU per worker process; the pool's child initialises CUDA after the fork)."""
    return ["worker", "--queues", queue, "--concurrency", "1", "--pool", "prefork",
            "--hostname", name, "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
