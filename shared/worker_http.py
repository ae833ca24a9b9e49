"""The small HTTP side of a Celery worker (sampler or reward): liveness, readiness, metrics, admin.

``flowrl worker sampler|reward --http-port P`` serves it from a thread of the worker's main
process, next to the Celery consumer:

* ``GET /health/live``: 200 while the process runs;
* ``GET /health/ready``: 200 when the broker answers a ping, else 503 with the reason (a
  worker that cannot reach Redis should not count as up);
* ``GET /metrics``: the worker's Prometheus metrics, collected across its processes. Celery
  forks a pool child that runs the tasks, so metrics live in prometheus-client's multiprocess
  mode: every process writes to ``PROMETHEUS_MULTIPROC_DIR`` (:func:`prepare_multiprocess_dir`
  creates one before anything imports prometheus_client) and ``/metrics`` merges the files;
* ``GET /admin/status``: the worker's name, its queue, whether it is consuming it and the tasks it
  is running; ``POST /admin/drain``: stop taking tasks from the queue (the running one finishes;
  a node to maintain, or a preStop hook); ``POST /admin/resume``: take them again. Celery's remote
  control (:class:`WorkerControl`) carries them to the worker's main process. With a token
  (``FLOWRL_API_TOKEN``) the admin routes need it (``Authorization: Bearer <token>``).

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




class WorkerControl:
    """Celery's remote control, aimed at one worker: ``app`` its Celery app, ``name`` its hostname
    (``--hostname``), ``queue`` the queue it consumes. Each call waits up to ``timeout`` seconds
    for the worker's reply (its main process answers while the pool child runs a task)."""

    def __init__(self, app, name: str, queue: str, timeout: float = 5.0) -> None:
        self.app, self.name, self.queue, self.timeout = app, name, queue, timeout

    def _reply(self, replies) -> dict:
        """This worker's entry of the replies (a list of ``{hostname: reply}``); TimeoutError without one."""
        for reply in replies or []:
            if reply and self.name in reply:
                return reply[self.name]
        raise TimeoutError(f"worker {self.name} did not answer the broker within {self.timeout:g} s")

    def status(self) -> dict:
        inspect = self.app.control.inspect(destination=[self.name], timeout=self.timeout)
        queues = self._reply([inspect.active_queues()])
        active = (inspect.active() or {}).get(self.name) or []
        return {"worker": self.name, "queue": self.queue, "consuming": any(q.get("name") == self.queue for q in queues),
                "active_tasks": [t.get("id") for t in active]}

    def drain(self) -> dict:
        self._reply(self.app.control.cancel_consumer(self.queue, destination=[self.name], reply=True,
                                                     timeout=self.timeout))
        return self.status()

    def resume(self) -> dict:
        self._reply(self.app.control.add_consumer(self.queue, destination=[self.name], reply=True,
                                                  timeout=self.timeout))
        return self.status()


def create_app(broker_url: str, title: str, control: WorkerControl | None = None):
    """The FastAPI app of the module docstring, for a worker called ``title`` (``control``: its
    admin routes; none without)."""
    from fastapi import Depends, FastAPI, Header, HTTPException
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from shared.serving import BEARER_HELP, CHALLENGE, bearer_ok

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)  # (no document without the token)
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

    if control is None:
        return app
    token = os.environ.get("FLOWRL_API_TOKEN") or None
    token = token.encode() if token else None

    def authorize(authorization: str | None = Header(None)) -> None:
        if not bearer_ok(authorization, token):
            raise HTTPException(401, BEARER_HELP, CHALLENGE)

    def answer(call):
        try:
            return call()
        except TimeoutError as e:
            return JSONResponse({"error": str(e)}, status_code=504)

    @app.get("/admin/status", dependencies=[Depends(authorize)])
    def status():
        return answer(control.status)

    @app.post("/admin/drain", dependencies=[Depends(authorize)])
    def drain():
        return answer(control.drain)

    @app.post("/admin/resume", dependencies=[Depends(authorize)])
    def resume():
        return answer(control.resume)

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
