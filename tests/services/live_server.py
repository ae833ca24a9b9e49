"""Run the real reward server under uvicorn on a free loopback port, in a background thread.

Used by the integration tests of the server and of the ``remote`` reward client. The socket is
bound before uvicorn starts (no port race), and the server is stopped and its thread joined
when the context exits, so no test leaves a server running.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import uvicorn

from services.reward import RewardServerSettings, create_app


@contextmanager
def running_server(settings: RewardServerSettings, *, wait_ready: bool = True) -> Iterator[str]:
    """Serve ``settings`` on ``127.0.0.1:<free port>``; yields the base URL ``http://127.0.0.1:PORT``."""
    headers = {"Authorization": f"Bearer {settings.token.get_secret_value()}"} if settings.token else {}
    with running_app(create_app(settings), ready_path="/v2/health/ready" if wait_ready else None,
                     headers=headers) as url:
        yield url


@contextmanager
def running_app(app, *, ready_path: str | None = None, headers: dict | None = None) -> Iterator[str]:
    """Serve any ASGI ``app`` on ``127.0.0.1:<free port>`` (and wait until ``ready_path`` answers 200)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"reward-server-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"reward server on port {port} did not start")
            time.sleep(0.01)
        while ready_path and httpx.get(f"{url}{ready_path}", headers=headers or {}).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"reward server on port {port} never became ready")
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        if thread.is_alive():
            raise RuntimeError(f"reward server thread on port {port} did not stop")
