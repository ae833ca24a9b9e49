"""Suite-wide fixtures: the Redis that integration tests use.

``redis_url``: ``FLOWRL_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``) when it answers;
otherwise a throwaway ``redis-server`` on a free port when the binary is installed; otherwise
the test FAILS with how to get Redis (never a silent skip). Tests keep their keys under their
own prefix / queue namespace and delete only those.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest


def _answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url():
    url = os.environ.get("FLOWRL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    if _answers(url):
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(f"integration tests need Redis: nothing answers at {url} and redis-server is not "
                    f"installed. Fix: start Redis (e.g. `docker run -p 6379:6379 redis:7` or "
                    f"`apt-get install redis-server`), or set FLOWRL_TEST_REDIS_URL.")
    port, workdir = _free_port(), tempfile.mkdtemp(prefix="flowrl-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while not _answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"started {binary} on port {port} but it does not answer")
        time.sleep(0.05)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
