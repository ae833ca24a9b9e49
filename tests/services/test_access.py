"""Access: the reward server's bearer token (required when configured, compared in constant time),
and every HTTP listener bound to the configured interface only (loopback by default).

Which route needs the token is in test_reward_server.py::test_bearer_token_guards_everything_but_liveness.
"""

from __future__ import annotations

import ast
import base64
import inspect
import io
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import services.reward.server as reward_server
from services.reward import RewardServerSettings, create_app
from shared.config import Config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_server_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("FLOWRL_REWARD_")] + ["FLOWRL_API_TOKEN"]:
        monkeypatch.delenv(key, raising=False)


def _body() -> dict:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [data]},
                       {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["p"]}]}


def _infer(c: TestClient, headers: dict) -> int:
    return c.post("/v2/models/brightness/infer", json=_body(), headers=headers).status_code


# --- bearer token ---------------------------------------------------------------------------------


def test_token_compared_with_hmac_compare_digest(monkeypatch):
    import shared.serving

    calls = []
    real = shared.serving.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(shared.serving.hmac, "compare_digest", spy)
    with TestClient(create_app(RewardServerSettings(rewards="brightness", token="s3cret"))) as c:
        assert _infer(c, {"Authorization": "Bearer s3cret-but-longer"}) == 401
        assert _infer(c, {"Authorization": "Bearer s3cret"}) in (200, 503)  # 503 while still loading
    assert calls[:2] == [(b"s3cret-but-longer", b"s3cret"), (b"s3cret", b"s3cret")]


def test_the_check_never_compares_the_token_with_equality():
    """No ``==``/``!=``/``in`` on the token in the check: those return early at the first differing
    byte (a timing side channel); only compare_digest may see it."""
    from services.sampler import server as sampler_server
    from shared.serving import bearer_ok

    tree = ast.parse(textwrap.dedent(inspect.getsource(bearer_ok)))
    compares = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Compare) and "token" in ast.unparse(n)
                and not ast.unparse(n).endswith("is None")]
    assert compares == [], compares
    assert "compare_digest" in inspect.getsource(bearer_ok)
    for server in (reward_server, sampler_server):  # both servers check through it
        assert "bearer_ok(" in inspect.getsource(server._authorize)


def test_token_from_the_environment_and_empty_means_none(monkeypatch):
    monkeypatch.setenv("FLOWRL_API_TOKEN", "from-env")
    with TestClient(create_app(RewardServerSettings(rewards="brightness"))) as c:
        assert _infer(c, {}) == 401
        assert c.get("/v2/health/ready", headers={"Authorization": "Bearer from-env"}).status_code in (200, 503)
    monkeypatch.setenv("FLOWRL_API_TOKEN", "")
    assert RewardServerSettings(rewards="brightness").token is None


def test_a_plain_token_variable_is_not_the_servers_token(monkeypatch):
    """A TOKEN (or token) variable some other tool set does not replace FLOWRL_API_TOKEN: the field's
    name was also an environment alias, so the server wanted another token than its health check,
    Prometheus and the remote reward sent."""
    from services.sampler.settings import SamplerServerSettings

    monkeypatch.setenv("FLOWRL_API_TOKEN", "the-token")
    monkeypatch.setenv("TOKEN", "something-else")
    monkeypatch.setenv("token", "something-else")
    assert RewardServerSettings(rewards="brightness").token.get_secret_value() == "the-token"
    assert SamplerServerSettings(config="x.yaml").token.get_secret_value() == "the-token"
    assert RewardServerSettings(rewards="brightness", token="given").token.get_secret_value() == "given"


def test_unicode_and_odd_headers_get_401_not_500():
    with TestClient(create_app(RewardServerSettings(rewards="brightness", token="s3cret"))) as c:
        for value in ("Bearer", "Bearer ", "bearer s3cret ", "Bearer s3cr\u00e9t", "Bearer " + "x" * 10_000):
            code = c.get("/metrics", headers={"Authorization": value.encode("utf-8")}).status_code
            assert code == (200 if value.strip().lower() == "bearer s3cret" else 401), value[:20]


def test_basic_auth_with_the_token_as_password():
    """HTTP Basic with the token as the password (any user name) passes; a wrong password, a
    missing one or a malformed header gets 401, never 500."""
    def basic(text: bytes) -> str:
        return "Basic " + base64.b64encode(text).decode()

    with TestClient(create_app(RewardServerSettings(rewards="brightness", token="s3cret"))) as c:
        for value, ok in ((basic(b"flowrl:s3cret"), True), (basic(b":s3cret"), True), (basic(b"s3cret:x"), False),
                          (basic(b"flowrl:s3cre"), False), (basic(b"s3cret"), False), ("Basic !!not-base64", False),
                          (basic(b"flowrl:\xff\xfe"), False), ("Basic", False)):
            code = c.get("/metrics", headers={"Authorization": value}).status_code
            assert code == (200 if ok else 401), value
    with TestClient(create_app(RewardServerSettings(rewards="brightness", token="s3crét"))) as c:
        for password, ok in (("s3crét".encode("utf-8"), True), ("s3crét".encode("latin-1"), True), (b"s3cret", False)):
            code = c.get("/metrics", headers={"Authorization": basic(b"u:" + password)}).status_code
            assert code == (200 if ok else 401), password


def test_flow_factory_client_reaches_a_token_protected_server_through_its_url():
    """Flow-Factory's remote reward sends no headers of its own (a requests.Session posting to
    ``{server_url}/compute``): with the token as the URL's password, requests sends it as Basic
    auth and the protected server answers; without it, 401 with a message saying how."""
    import requests

    from tests.services.live_server import running_server

    settings = RewardServerSettings(rewards=["brightness"], token="s3cret", max_queue_delay_ms=0, log_level="warning")
    image = _body()["inputs"][0]["data"][0]
    with running_server(settings) as url:
        session = requests.Session()
        open_url = url.replace("http://", "http://flowrl:s3cret@")
        assert session.get(f"{open_url}/health", timeout=5).status_code == 200
        reply = session.post(f"{open_url}/compute", json={"prompt": ["p"], "image": [image]}, timeout=30)
        assert reply.status_code == 200 and len(reply.json()["rewards"]) == 1
        refused = session.post(f"{url}/compute", json={"prompt": ["p"], "image": [image]}, timeout=30)
        assert refused.status_code == 401 and "http://flowrl:<token>@host:port" in refused.text


# --- binding ----------------------------------------------------------------------------------------


@pytest.fixture
def uvicorn_run(monkeypatch):
    """Record ``uvicorn.run``'s options instead of serving (and keep this process's torch threads)."""
    calls = []
    import torch
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append({"torch_threads": n}))
    return calls


def test_reward_server_listens_on_loopback_unless_told(uvicorn_run, monkeypatch, capsys):
    from services.reward.cli import main as serve

    assert RewardServerSettings(rewards="brightness").host == "127.0.0.1"
    assert serve(["--rewards", "brightness"]) == 0
    assert serve(["--rewards", "brightness", "--host", "10.1.2.3", "--port", "9001", "--token", "t"]) == 0
    monkeypatch.setenv("FLOWRL_REWARD_HOST", "::1")
    assert serve(["--rewards", "brightness"]) == 0
    served = [(c["host"], c["port"]) for c in uvicorn_run if "host" in c]
    assert served == [("127.0.0.1", 8000), ("10.1.2.3", 9001), ("::1", 8000)]
    assert "without a bearer token" not in capsys.readouterr().err  # loopback, or a token set


def test_reward_server_warns_when_exposed_without_a_token(uvicorn_run, capsys):
    from services.reward.cli import main as serve

    assert serve(["--rewards", "brightness", "--host", "0.0.0.0"]) == 0
    err = capsys.readouterr().err
    assert "listening on 0.0.0.0:8000 without a bearer token" in err and "FLOWRL_API_TOKEN" in err


def test_reward_server_sets_torch_threads(uvicorn_run, monkeypatch):
    from services.reward.cli import main as serve

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert serve(["--rewards", "brightness"]) == 0
    assert serve(["--rewards", "brightness", "--torch-threads", "3"]) == 0
    assert [c["torch_threads"] for c in uvicorn_run if "torch_threads" in c] == [4, 3]  # default: half the CPUs


@pytest.mark.parametrize("kind", ["sampler", "reward"])
def test_worker_http_side_binds_the_given_host(kind, monkeypatch):
    import importlib

    import shared.worker_http as worker_http

    served = []
    monkeypatch.setattr(worker_http, "serve_in_thread", lambda app, host, port, name: served.append((host, port)))
    monkeypatch.setattr(worker_http, "prepare_multiprocess_dir", lambda: None)
    monkeypatch.setenv("FLOWRL_WORKER_NAME", "x")  # restored after the test (the CLI sets it)
    worker = importlib.import_module(f"services.{kind}.worker")
    monkeypatch.setattr(worker.app, "worker_main", lambda argv: None)
    from trainer.cli import main as flowrl

    assert flowrl(["worker", kind, "--http-port", "9101"]) == 0
    assert flowrl(["worker", kind, "--http-port", "9102", "--http-host", "10.0.0.5"]) == 0
    assert served == [("127.0.0.1", 9101), ("10.0.0.5", 9102)]


def test_trainer_metrics_listen_on_loopback_by_default():
    assert Config.model_fields["metrics_host"].default == "127.0.0.1"


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} writes them) listening on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                out.add(address)
    return out


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the kernel's socket table (Linux)")
def test_flowrl_serve_reward_binds_loopback_only_by_default():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"PYTHONPATH": str(ROOT), "FLOWRL_API_TOKEN": ""}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "serve", "reward", "--rewards", "brightness",
                             "--port", str(port), "--log-level", "warning"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _listening(port):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "flowrl serve reward never listened"
            time.sleep(0.1)
        assert _listening(port) == {"0100007F"}  # 127.0.0.1, and nothing else (no 0.0.0.0, no ::)
        assert httpx.get(f"http://127.0.0.1:{port}/v2/health/live").status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the second server's bind error
def test_the_worker_http_side_listens_before_the_pool_forks():
    """serve_in_thread returns once uvicorn listens (Celery forks its pool right after; a fork while
    the thread is still importing can hang the child), and says so when the port is taken."""
    import socket

    import httpx

    from shared import worker_http

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = worker_http.serve_in_thread(worker_http.create_app("redis://127.0.0.1:1/0", "t"), "127.0.0.1", port,
                                         name="t-http")
    try:
        assert server.started
        assert httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=5).json() == {"live": True}
        with pytest.raises(RuntimeError, match="port"):
            worker_http.serve_in_thread(worker_http.create_app("redis://127.0.0.1:1/0", "t"), "127.0.0.1", port,
                                        name="t-http-2")
    finally:
        server.should_exit = True
