"""The sampler's HTTP side: liveness, honest readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from services.sampler.app import create_app, observe_job
from tests.helpers.procs import free_port


def test_ready_only_when_the_broker_answers(redis_url):
    assert TestClient(create_app(redis_url)).get("/health/ready").json() == {"ready": True}
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = TestClient(create_app(dead))
    assert client.get("/health/live").status_code == 200
    r = client.get("/health/ready")
    assert r.status_code == 503 and dead in r.json()["reason"]
    secret = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    r = TestClient(create_app(secret)).get("/health/ready")
    assert r.status_code == 503 and "s3cret" not in r.text and ":***@127.0.0.1" in r.text


def test_metrics_count_jobs_and_samples(redis_url):
    client = TestClient(create_app(redis_url))
    def value(name):
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        return {s.name: s.value for s in families[name].samples}

    before = value("flowrl_sampler_samples")["flowrl_sampler_samples_total"]
    observe_job(samples=12, seconds=0.7, policy_version=5)
    assert value("flowrl_sampler_samples")["flowrl_sampler_samples_total"] == before + 12
    assert value("flowrl_sampler_policy_version")["flowrl_sampler_policy_version"] == 5
    assert value("flowrl_sampler_batch_seconds")["flowrl_sampler_batch_seconds_count"] >= 1
