"""The reward worker's metrics and its small HTTP side (:mod:`shared.worker_http`).

``flowrl worker reward --http-port 9102`` serves ``/health/live``, ``/health/ready`` and
``/metrics`` from a thread of the worker's main process; the pool child that scores writes the
metrics below to ``PROMETHEUS_MULTIPROC_DIR`` (the CLI sets one up). The reward *server*
(``flowrl serve reward``) has its own ``/metrics`` (:mod:`services.reward.metrics`).

Metrics (Prometheus naming):

* ``flowrl_reward_worker_batches_total``: reward jobs scored (one trajectory each);
* ``flowrl_reward_worker_samples_total``: samples scored;
* ``flowrl_reward_worker_batch_seconds`` (histogram): one job, images fetched to scores out;
* ``flowrl_reward_worker_score{reward}`` (summary: ``_sum`` / ``_count``): the values each
  reward gave (abstentions, ``None``, are not observed), so mean = rate(sum) / rate(count);
* ``flowrl_reward_worker_gpu_memory_bytes``: CUDA memory the task process holds after its last job;
* ``flowrl_reward_worker_dead_letters_total``: reward tasks this worker gave up on.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Summary

from shared import worker_http

BATCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)

BATCHES = Counter("flowrl_reward_worker_batches", "Reward jobs (one trajectory each) scored.")
SAMPLES = Counter("flowrl_reward_worker_samples", "Samples scored.")
BATCH_SECONDS = Histogram("flowrl_reward_worker_batch_seconds",
                          "Seconds per reward job (fetch images, score with every reward).", buckets=BATCH_BUCKETS)
SCORE = Summary("flowrl_reward_worker_score", "Reward values scored, by reward name (abstentions excluded).",
                ["reward"])
GPU_MEMORY = Gauge("flowrl_reward_worker_gpu_memory_bytes",
                   "CUDA memory allocated by the task process after its last job.", multiprocess_mode="mostrecent")
DEAD_LETTERS = Counter("flowrl_reward_worker_dead_letters", "Reward tasks dead-lettered by this worker.")


def observe_batch(rewards: dict[str, list[float | None]], seconds: float) -> None:
    """Count one scored job: ``rewards`` maps reward name to per-sample values (None abstains)."""
    BATCHES.inc()
    SAMPLES.inc(max((len(v) for v in rewards.values()), default=0))
    BATCH_SECONDS.observe(seconds)
    for name, values in rewards.items():
        child = SCORE.labels(reward=name)
        for value in values:
            if value is not None:
                child.observe(value)
    GPU_MEMORY.set(worker_http.gpu_memory_bytes())


def observe_dead_letter() -> None:
    DEAD_LETTERS.inc()


def create_app(broker_url: str, control: worker_http.WorkerControl | None = None):
    return worker_http.create_app(broker_url, title="flowrl reward worker", control=control)


def serve_in_thread(broker_url: str, host: str, port: int, control: worker_http.WorkerControl | None = None):
    """Start the app under uvicorn in a daemon thread; returns the uvicorn server."""
    return worker_http.serve_in_thread(create_app(broker_url, control), host, port, name="reward-worker-http")
