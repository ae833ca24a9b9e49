"""The sampler worker's metrics and its small HTTP side (:mod:`shared.worker_http`).

``flowrl worker sampler --http-port 9101`` serves ``/health/live``, ``/health/ready`` and
``/metrics`` from a thread of the worker's main process; the pool child that runs tasks writes
the metrics below to ``PROMETHEUS_MULTIPROC_DIR`` (the CLI sets one up).

Metrics (Prometheus naming): ``flowrl_sampler_rollouts_total``, ``flowrl_sampler_samples_total``,
``flowrl_sampler_batch_seconds`` (histogram: one job, model call to stored blobs),
``flowrl_sampler_policy_version`` (the version the last job used),
``flowrl_sampler_gpu_memory_bytes`` (CUDA memory the task process holds after its last job),
``flowrl_sampler_dead_letters_total`` (sample tasks this worker gave up on).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared import worker_http

BATCH_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

ROLLOUTS = Counter("flowrl_sampler_rollouts", "Sample jobs rolled out.")
SAMPLES = Counter("flowrl_sampler_samples", "Samples rolled out.")
BATCH_SECONDS = Histogram("flowrl_sampler_batch_seconds", "Seconds per sample job (rollout + storing).",
                          buckets=BATCH_BUCKETS)
POLICY_VERSION = Gauge("flowrl_sampler_policy_version", "Policy version used by the last job.",
                       multiprocess_mode="max")
GPU_MEMORY = Gauge("flowrl_sampler_gpu_memory_bytes", "CUDA memory allocated by the task process after its last job.",
                   multiprocess_mode="mostrecent")
DEAD_LETTERS = Counter("flowrl_sampler_dead_letters", "Sample tasks dead-lettered by this worker.")


def observe_job(samples: int, seconds: float, policy_version: int) -> None:
    ROLLOUTS.inc()
    SAMPLES.inc(samples)
    BATCH_SECONDS.observe(seconds)
    POLICY_VERSION.set(policy_version)
    GPU_MEMORY.set(worker_http.gpu_memory_bytes())


def observe_dead_letter() -> None:
    DEAD_LETTERS.inc()


def create_app(broker_url: str, control: worker_http.WorkerControl | None = None):
    return worker_http.create_app(broker_url, title="flowrl sampler", control=control)


def serve_in_thread(broker_url: str, host: str, port: int, control: worker_http.WorkerControl | None = None):
    """Start the app under uvicorn in a daemon thread; returns the uvicorn server."""
    return worker_http.serve_in_thread(create_app(broker_url, control), host, port, name="sampler-http")
