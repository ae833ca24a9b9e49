"""One wrapper that gives every flowrl Celery task the same failure policy.

:func:`guarded_task` registers ``body(task, message, state, attempt)`` as a bound Celery task
that takes the message as a JSON string and:

1. parses it (a message that does not parse is dead-lettered with the validation error);
2. counts this start of this attempt in Redis; beyond ``max_deliveries`` starts (the task
   keeps dying with its worker) it dead-letters and returns, so the message is acknowledged;
3. runs the body; transient errors are retried with exponential backoff
   (:func:`~shared.queue.retry_delay`), at most ``max_retries`` times; the last failure, and
   any non-transient error at once, becomes a :class:`~shared.protocol.DeadLetter`.

Every dead letter also calls ``on_dead_letter()`` (the worker's Prometheus counter).
"""

from __future__ import annotations

import json
import logging
from typing import Callable

from pydantic import ValidationError

from shared.protocol import DeadLetter
from shared.queue import QueueSettings, RunState, retry_delay

log = logging.getLogger("flowrl.tasks")

TRANSIENT = (ConnectionError, TimeoutError, OSError)


def _transient(exc: BaseException) -> bool:
    """Worth retrying later: connection / I/O / timeout errors, or any error that says so with
    ``retryable = True`` (e.g. a reward server that stayed unreachable for all its attempts)."""
    if isinstance(exc, TRANSIENT) or getattr(exc, "retryable", False):
        return True
    try:  # redis / httpx connection problems are transient too
        import redis

        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        import httpx

        return isinstance(exc, httpx.TransportError)
    except ImportError:  # pragma: no cover
        return False


def guarded_task(app, settings: QueueSettings, name: str, message_type, body: Callable, *,
                 job_id: Callable, sample_ids: Callable, run_id: Callable,
                 delivery_key: Callable | None = None, on_dead_letter: Callable[[], None] | None = None,
                 generation: Callable = lambda message: ""):
    """Register ``body`` as task ``name`` with the failure policy of the module docstring.

    ``job_id`` / ``sample_ids`` / ``run_id`` read the job id, its sample ids and
    ``(run_id, key_prefix)`` from a parsed message (for dead letters); ``delivery_key`` (default
    ``job_id``) names what one delivery is of, for the redelivery cap; ``on_dead_letter()`` runs
    after every dead letter written; ``generation`` reads the trainer start the job is of (for the
    letter: a resumed trainer ignores an earlier start's).
    """
    delivery_key = delivery_key or job_id
    counted = on_dead_letter or (lambda: None)
    states: dict[tuple[str, str], RunState] = {}

    def state_for(message) -> RunState:
        key = run_id(message)
        if key not in states:
            states[key] = RunState.connect(settings.broker_url, key[0], key[1])
        return states[key]

    @app.task(name=name, bind=True, max_retries=settings.max_retries)
    def task(self, raw: str) -> None:
        try:
            message = message_type.model_validate_json(raw)
        except ValidationError as e:
            _dead_letter_unparsed(settings, name, raw, e)
            counted()
            return
        state = state_for(message)
        attempt = self.request.retries
        starts = state.count_delivery(f"{name}:{delivery_key(message)}:r{attempt}")

        def give_up(error: str) -> None:
            log.error("%s %s: giving up: %s", name, job_id(message), error)
            state.dead_letter(DeadLetter(run_id=run_id(message)[0], task=name,
                                         job_id=job_id(message), sample_ids=sample_ids(message),
                                         error=error, attempts=attempt + starts, generation=generation(message)))
            counted()

        if starts > settings.max_deliveries:
            give_up(f"started {starts} times without finishing (the worker died each time; "
                    f"queue.max_deliveries={settings.max_deliveries})")
            return
        try:
            body(self, message, state, attempt)
        except Exception as e:  # noqa: BLE001 - every failure is retried or dead-lettered
            error = f"{type(e).__name__}: {e}"
            if _transient(e) and attempt < settings.max_retries:
                delay = retry_delay(attempt, settings.retry_backoff_s)
                log.warning("%s %s: %s; retry %d/%d in %.1f s", name, job_id(message), error,
                            attempt + 1, settings.max_retries, delay)
                raise self.retry(exc=e, countdown=delay)
            give_up(error)

    return task


def _dead_letter_unparsed(settings: QueueSettings, name: str, raw: str, error: ValidationError) -> None:
    """A message that does not parse still names its run if it can, so the trainer hears of it."""
    try:
        data = json.loads(raw)
        job = data.get("job_id") or data.get("trajectory", {}).get("job_id", "?")
        run = data.get("run_id") or data.get("trajectory", {}).get("run_id")
        prefix = data.get("key_prefix", "flowrl")
    except (ValueError, AttributeError):
        job, run, prefix = "?", None, "flowrl"
    log.error("%s: unparsable message for job %s: %s", name, job, error)
    if run:
        RunState.connect(settings.broker_url, run, prefix).dead_letter(DeadLetter(
            run_id=run, task=name, job_id=str(job), sample_ids=[], attempts=1,
            error=f"message does not parse: {error}"))
