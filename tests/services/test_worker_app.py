"""The reward worker's HTTP side (shared with the sampler: shared/worker_http.py): health and
Prometheus metrics, in this process and in multiprocess mode across a fork (as under Celery)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from services.reward.worker_app import create_app, observe_batch, observe_dead_letter
from tests.helpers.procs import ROOT, free_port


def samples(text: str) -> dict[str, float]:
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_health_and_readiness(redis_url):
    client = TestClient(create_app(redis_url))
    assert client.get("/health/live").json() == {"live": True}
    assert client.get("/health/ready").json() == {"ready": True}
    dead = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    r = TestClient(create_app(dead)).get("/health/ready")
    assert r.status_code == 503 and "s3cret" not in r.text and ":***@127.0.0.1" in r.text


def test_no_api_document_is_served():
    """/openapi.json answered an unauthenticated 500 (a locally imported annotation); there is none."""
    client = TestClient(create_app("redis://127.0.0.1:1/0"))
    assert [client.get(p).status_code for p in ("/openapi.json", "/docs", "/redoc")] == [404, 404, 404]


def test_metrics_count_batches_samples_scores_and_dead_letters(redis_url):
    client = TestClient(create_app(redis_url))
    before = samples(client.get("/metrics").text)
    observe_batch({"brightness": [0.25, None, 0.75], "aesthetic": [1.0, 2.0, 3.0]}, seconds=0.3)
    observe_dead_letter()
    after = samples(client.get("/metrics").text)

    def delta(key: str) -> float:
        return after[key] - before.get(key, 0.0)

    assert delta("flowrl_reward_worker_batches_total{}") == 1
    assert delta("flowrl_reward_worker_samples_total{}") == 3
    assert delta("flowrl_reward_worker_batch_seconds_count{}") == 1
    assert delta('flowrl_reward_worker_score_count{"reward": "brightness"}') == 2  # None abstains
    assert delta('flowrl_reward_worker_score_sum{"reward": "brightness"}') == 1.0
    assert delta('flowrl_reward_worker_score_sum{"reward": "aesthetic"}') == 6.0
    assert delta("flowrl_reward_worker_dead_letters_total{}") == 1
    assert after["flowrl_reward_worker_gpu_memory_bytes{}"] == 0  # no CUDA in this process


FORKED = """
import json, os, sys
from shared.worker_http import prepare_multiprocess_dir
prepare_multiprocess_dir()
from fastapi.testclient import TestClient
from services.reward.worker_app import create_app, observe_batch
client = TestClient(create_app(sys.argv[1]))
pid = os.fork()
if pid == 0:  # the Celery pool child: scores, writes its metrics file, exits
    observe_batch({"brightness": [0.5, 0.5]}, seconds=1.0)
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps(client.get("/metrics").text))
"""


def test_multiprocess_mode_collects_what_the_forked_child_observed(redis_url, tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", FORKED, redis_url], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    values = samples(json.loads(out.stdout.strip().splitlines()[-1]))
    assert values["flowrl_reward_worker_samples_total{}"] == 2
    assert values['flowrl_reward_worker_score_sum{"reward": "brightness"}'] == 1.0
    assert values["flowrl_reward_worker_dead_letters_total{}"] == 0  # exported before any dead letter
    assert list(tmp_path.glob("*.db")), "no per-process metric files were written"
