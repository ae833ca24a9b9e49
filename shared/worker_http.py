"""The small HTTP side of a Celery worker (sampler or reward): liveness, readiness, metrics.

``flowrl worker sampler|reward --http-port P`` serves it from a thread of the worker's main
process, next to the Celery consumer:

* ``GET /health/live``: 200 while the process runs;
* ``GET /health/ready``: 200 when the broker answers a ping, else 503 with the reason (a
  worker that cannot reach Redis should not count as up);
* ``GET /metrics``: the worker's Prometheus metrics, collected across its processes. Celery
  forks a pool child that runs the tasks, so metrics live in prometheus-client's multiprocess
  mode: every process writes to ``PROMETHEUS_MULTIPROC_DIR`` (:func:`prepare_multiprocess_dir`
  creates one before anything imports prometheus_client) and ``/metrics`` merges the files.

The metric definitions stay with each service (``services/sampler/app.py``,
``services/reward/worker_app.py``); this module only serves them.
"""

from __future__ import annotations

import os
import tempfile

from shared.queue import redact  # noqa: F401  (health answers show the broker URL redacted)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir() -> str:
    """Make sure ``PROMETHEUS_MULTIPROC_DIR`` names a directory; returns it.

    Call it before the first ``import prometheus_client`` of the process (the client picks its
    multiprocess value class at import time). A fresh temporary directory per worker start,
    unless the variable is already set (then the operator owns wiping it between starts).
    """
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        path = os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="flowrl-metrics-")
    os.makedirs(path, exist_ok=True)
    return path


def metrics_registry():
    """The registry ``/metrics`` serves: the merged per-process files in multiprocess mode,
    else the process's default registry (tests, a worker started without ``--http-port``)."""
    from prometheus_client import REGISTRY, CollectorRegistry

    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def gpu_memory_bytes() -> int:
    """CUDA memory allocated by this process (0 without CUDA, or before torch is imported:
    asking would initialise CUDA, which must not happen in a Celery main process)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():  # is_available() could initialise it
        return 0
    return int(torch.cuda.memory_allocated())




def create_app(broker_url: str, title: str):
    """The FastAPI app of the module docstring, for a worker called ``title``."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = FastAPI(title=title, docs_url=None, redoc_url=None)
    # what the handlers would import on first use, imported now: Celery forks its pool after the
    # server starts, and a module half-imported by this thread at that moment stays locked in the child
    import redis  # noqa: F401
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess  # noqa: F401

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
        return Response(generate_latest(metrics_registry()), media_type=CONTENT_TYPE_LATEST)

    return app


def serve_in_thread(app, host: str, port: int, name: str, startup_timeout: float = 60.0):
    """Run ``app`` under uvicorn in a daemon thread called ``name`` and wait until it listens;
    returns the uvicorn server.

    Waiting matters: the caller forks Celery's pool next, and a fork while this thread is still
    importing (uvicorn, the app's modules) can leave the child a module lock it never gets back,
    so its first task hangs. :class:`RuntimeError` if the server stops (e.g. the port is taken)
    or has not started after ``startup_timeout`` seconds."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"{name}: the HTTP server on {host}:{port} stopped while starting (is the port "
                               f"taken?). Fix: pick another --http-port.")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: the HTTP server on {host}:{port} did not start within {startup_timeout:g} s")
        time.sleep(0.01)
    return server
