"""Redis access: password and TLS broker URLs, read the same way by redis-py (the run state) and
Celery (the queues), against throwaway ``redis-server`` processes started here.

The TLS test needs ``openssl`` (to make a self-signed certificate) and a ``redis-server`` built
with TLS (Debian's is); without either it is skipped with the reason.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from shared.protocol import TASK_SAMPLE
from shared.queue import QueueSettings, RunState, celery_config, make_celery

# --- URL handling (no server) --------------------------------------------------------------------


@pytest.mark.parametrize("url", ["redis://:s3cret@redis:6379/0", "redis://flowrl:s3cret@redis:6379/2",
                                 "unix:///run/redis/redis.sock?db=1"])
def test_password_and_socket_urls_pass_unchanged(url):
    settings = QueueSettings(broker_url=url)
    assert settings.broker_url == url and celery_config(settings)["broker_url"] == url


def test_tls_urls_verify_the_certificate_by_default(monkeypatch):
    # kombu would skip verification for a bare rediss:// URL while redis-py enforces it
    assert QueueSettings(broker_url="rediss://:pw@redis:6380/0").broker_url == "rediss://:pw@redis:6380/0?ssl_cert_reqs=required"
    with_ca = "rediss://redis:6380/0?ssl_ca_certs=/etc/ssl/ca.pem"
    assert QueueSettings(broker_url=with_ca).broker_url == with_ca + "&ssl_cert_reqs=required"
    explicit = "rediss://redis:6380/0?ssl_cert_reqs=none"
    assert QueueSettings(broker_url=explicit).broker_url == explicit  # an explicit choice is kept
    monkeypatch.setenv("FLOWRL_QUEUE_BROKER_URL", "rediss://redis:6380/0")
    assert QueueSettings().broker_url.endswith("?ssl_cert_reqs=required")  # the environment too


@pytest.mark.parametrize("url, message", [
    ("amqp://guest@rabbit//", "must be a Redis URL, got scheme 'amqp'"),
    ("redis-server:6379", "must be a Redis URL"),
    ("rediss://redis:6380/0?ssl_cert_reqs=CERT_REQUIRED", "ssl_cert_reqs='CERT_REQUIRED' is not understood"),
])
def test_bad_broker_urls_are_refused_with_the_fix(url, message):
    with pytest.raises(ValidationError, match="Fix") as info:
        QueueSettings(broker_url=url)
    assert message in str(info.value)


# --- real servers --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server(tmp_path: Path, *args: str, port_flag: str = "--port"):
    """A throwaway redis-server on a free loopback port (``port_flag`` ``--tls-port`` for TLS);
    yields the port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("these tests need redis-server (apt-get install redis-server)")
    port = _free_port()
    plain = [] if port_flag == "--port" else ["--port", "0"]
    proc = subprocess.Popen([binary, port_flag, str(port), *plain, "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read()
                if "TLS" in out or "tls" in out:
                    pytest.skip(f"redis-server cannot serve TLS here: {out[-300:]}")
                pytest.fail(f"redis-server exited: {out[-1000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "redis-server did not listen"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _celery_delivers(url: str, namespace: str) -> None:
    """Publish one task through Celery at ``url`` (raises when Celery cannot connect)."""
    app = make_celery(QueueSettings(broker_url=url, namespace=namespace))
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=0, timeout=5)
        app.send_task(TASK_SAMPLE, args=[{}], queue=f"{namespace}.sample", connection=conn)


@pytest.mark.integration
def test_password_protected_redis(tmp_path):
    with redis_server(tmp_path, "--requirepass", "s3cret") as port:
        good = QueueSettings(broker_url=f"redis://:s3cret@127.0.0.1:{port}/0").broker_url
        state = RunState.connect(good, "run1", "pw-test")
        state.count_delivery("job")
        assert state.count_delivery("job") == 2
        _celery_delivers(good, "pw")
        assert redis.Redis.from_url(good).llen("pw.sample") == 1
        for bad in (f"redis://127.0.0.1:{port}/0", f"redis://:wrong@127.0.0.1:{port}/0"):
            with pytest.raises(redis.AuthenticationError):
                RunState.connect(bad, "run1", "pw-test").count_delivery("job")
            with pytest.raises(Exception, match="(?i)auth|password"):
                _celery_delivers(bad, "pw")


def _self_signed(directory: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make a test certificate)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert


@pytest.mark.integration
def test_tls_redis_verified_by_both_clients(tmp_path):
    cert = _self_signed(tmp_path)
    tls = ["--tls-cert-file", str(cert), "--tls-key-file", str(tmp_path / "key.pem"),
           "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--requirepass", "pw"]
    with redis_server(tmp_path, *tls, port_flag="--tls-port") as port:
        trusted = QueueSettings(broker_url=f"rediss://:pw@127.0.0.1:{port}/0?ssl_ca_certs={cert}").broker_url
        state = RunState.connect(trusted, "run1", "tls-test")
        assert state.count_delivery("job") == 1
        _celery_delivers(trusted, "tls")
        assert redis.Redis.from_url(trusted).llen("tls.sample") == 1
        # without the CA the self-signed certificate is refused by BOTH clients (Celery included)
        untrusted = QueueSettings(broker_url=f"rediss://:pw@127.0.0.1:{port}/0").broker_url
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            RunState.connect(untrusted, "run1", "tls-test").count_delivery("job")
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            _celery_delivers(untrusted, "tls")
        # plain text to the TLS port does not get in
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(f"redis://:pw@127.0.0.1:{port}/0", socket_timeout=2).ping()
