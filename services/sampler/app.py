"""The sampler worker's small HTTP side: liveness, readiness and Prometheus metrics.

``flowrl worker sampler --http-port 9101`` serves it from a thread of the worker's main
process, next to the Celery consumer:

* ``GET /health/live``: 200 while the process runs;
* ``GET /health/ready``: 200 when the broker answers a ping, else 503 with the reason (a
  sampler that cannot reach Redis should not receive traffic or count as up);
* ``GET /metrics``: the metrics below, collected across the worker's processes (the pool child
  that runs tasks writes them to ``PROMETHEUS_MULTIPROC_DIR``; the CLI sets one up).

Metrics (Prometheus naming): ``flowrl_sampler_rollouts_total``, ``flowrl_sampler_samples_total``,
``flowrl_sampler_batch_seconds`` (histogram: one job, model call to stored blobs),
``flowrl_sampler_policy_version`` (the version the last job used).
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

ROLLOUTS = Counter("flowrl_sampler_rollouts", "Sample jobs rolled out.")
SAMPLES = Counter("flowrl_sampler_samples", "Samples rolled out.")
BATCH_SECONDS = Histogram("flowrl_sampler_batch_seconds", "Seconds per sample job (rollout + storing).",
                          buckets=BATCH_BUCKETS)
POLICY_VERSION = Gauge("flowrl_sampler_policy_version", "Policy version used by the last job.",
                       multiprocess_mode="max")


def observe_job(samples: int, seconds: float, policy_version: int) -> None:
    ROLLOUTS.inc()
    SAMPLES.inc(samples)
    BATCH_SECONDS.observe(seconds)
    POLICY_VERSION.set(policy_version)


def _registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    from prometheus_client import REGISTRY

    return REGISTRY


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (what a health answer may show)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def create_app(broker_url: str) -> FastAPI:
    app = FastAPI(title="flowrl sampler", docs_url=None, redoc_url=None)

    @app.get("/health/live")
    def live() -> dict:
        return {"live": True}

    @app.get("/health/ready")
    def ready():
        import redis

        try:
            redis.Redis.from_url(broker_url, socket_connect_timeout=2, socket_timeout=2).ping()
        except redis.RedisError as e:
            return JSONResponse({"ready": False, "reason": f"broker {redact(broker_url)} does not answer: {e}"},
                                status_code=503)
        return {"ready": True}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)

    return app


def serve_in_thread(broker_url: str, host: str, port: int):
    """Start the app under uvicorn in a daemon thread; returns the uvicorn server."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(broker_url), host=host, port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, name="sampler-http", daemon=True).start()
    return server
