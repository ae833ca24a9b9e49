"""A real Prometheus scrapes a small real distributed run, and every dashboard query has data.

Processes (all on 127.0.0.1): the reward server (uvicorn), a sampler worker and a reward worker
(Celery, real Redis, each with ``--http-port``), ``flowrl trainer`` on the toy pipeline with
``metrics_port``, the preview server (``flowrl serve sampler`` on the same toy model, asked for
one image so that its request, image and latency series exist), and the Prometheus server binary
(Debian's ``prometheus`` package, unpacked into the venv by ``make tools``) with its storage in a
temporary folder.

Its config is deploy/prometheus.yml with each flowrl job's DNS discovery replaced by the
address of the process started here (so a job added there without a process here fails this
test) and a 1 s scrape interval. While the trainer trains, the test polls Prometheus's HTTP API
until ``up == 1`` for every job and EVERY PromQL expression of every dashboard JSON (read from
the files, not listed here) returns a non-empty result, then stops the run.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from shared.queue import RunState, delete_namespace_queues
from tests.deploy.test_prometheus import DASHBOARDS, PROMETHEUS, dashboard_exprs, metric_names
from tests.helpers.procs import FLOWRL, ProcessGroup, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# Far more epochs than the test waits for: the trainer must still be running (its target up)
# when every query has data, however slow the machine; the test stops it then. An epoch is one
# group of 2 samples with 4 denoising steps (about half a second on a free CPU core).
CONFIG = """
run_name: promlive
logging_backend: none
model: {model_type: sd3-5, model_name_or_path: assets/toy-sd3, finetune_type: lora, lora_rank: 4}
data: {dataset_dir: examples/data/toy}
train:
  trainer_type: nft
  num_train_timesteps: 1
  resolution: 64
  num_inference_steps: 4
  group_size: 2
  unique_sample_num_per_epoch: 1
  per_device_batch_size: 2
  max_epochs: 1000
  max_staleness: 1
  seed: 0
eval: {num_inference_steps: 4, eval_freq: 0, num_prompts: 1, per_device_batch_size: 1}
rewards:
  - {name: brightness, reward_model: remote, url: "URL", protocol: v2, timeout: 30, retries: 5, backoff: 0.2}
"""
# Jobs of deploy/prometheus.yml that cannot have a target here, and why.
NOT_HERE = {"dcgm": "NVIDIA's dcgm-exporter needs NVIDIA GPUs and DCGM; this machine has neither"}
# Dashboard queries that select these metrics are not checked, for the same reason: only the
# dcgm-exporter exports DCGM_* series (GPU utilisation and memory of the GPU panels).
NOT_HERE_METRIC_PREFIX = "DCGM_"


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or str(Path(sys.executable).with_name("prometheus"))
    if not Path(found).exists():
        pytest.fail("the Prometheus server binary is not installed: `make tools` unpacks it from Debian's "
                    "`prometheus` package into .venv/bin (by hand: `apt-get download prometheus && "
                    "dpkg-deb -x prometheus_*.deb x && cp x/usr/bin/prometheus .venv/bin/`), or "
                    "`apt-get install prometheus`")
    return found


def live_config(targets: dict[str, str]) -> dict:
    """deploy/prometheus.yml with static targets for the processes of this test."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    jobs = []
    for job in config["scrape_configs"]:
        name = job["job_name"]
        if name in NOT_HERE:
            continue
        assert name in targets, f"deploy/prometheus.yml has a job {name!r} that this test starts nothing for: " \
                                f"start its service here, or list it in NOT_HERE with the reason"
        job = {k: v for k, v in job.items() if k not in ("dns_sd_configs", "static_configs", "authorization")}
        job["static_configs"] = [{"targets": [targets[name]]}]  # (the reward server here has no token)
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


def query(base: str, expr: str) -> list[dict]:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"Prometheus rejected {expr!r}: {body}"
    return body["data"]["result"]


def missing_data(base: str, exprs: list[str], jobs: list[str]) -> list[str]:
    """What is not there yet: jobs whose targets are not all up, expressions without data."""
    problems = []
    for job in jobs:
        values = [s["value"][1] for s in query(base, f'up{{job="{job}"}}')]
        if not values or any(v != "1" for v in values):
            problems.append(f"up{{job={job!r}}} = {values}")
    problems += [f"no data: {expr}" for expr in exprs if not query(base, expr)]
    return problems


def test_every_dashboard_query_returns_data_from_a_live_run(tmp_path, redis_url):
    exprs = sorted({expr for path in DASHBOARDS for _, expr in dashboard_exprs(json.loads(path.read_text()))})
    skipped = [e for e in exprs if any(n.startswith(NOT_HERE_METRIC_PREFIX) for n in metric_names(e))]
    checked = [e for e in exprs if e not in skipped]
    assert checked and len(skipped) <= 2, f"only the GPU panels may be skipped, not {skipped}"
    binary = prometheus_binary()

    ns = f"test-{uuid.uuid4().hex[:8]}"
    queue_env = {"FLOWRL_QUEUE_BROKER_URL": redis_url, "FLOWRL_QUEUE_NAMESPACE": ns,
                 "FLOWRL_QUEUE_KEY_PREFIX": ns, "FLOWRL_QUEUE_STORE_URL": f"file://{tmp_path}/blobs",
                 "FLOWRL_QUEUE_TASK_TIME_LIMIT_S": "300", "FLOWRL_QUEUE_COLLECT_TIMEOUT_S": "300",
                 "FLOWRL_QUEUE_POLICY_WAIT_S": "300", "OMP_NUM_THREADS": "1"}
    ports = {name: free_port() for name in ("reward", "sampler", "worker", "trainer", "preview", "prometheus")}
    config = tmp_path / "promlive.yaml"
    config.write_text(CONFIG.replace("URL", f"http://127.0.0.1:{ports['reward']}"))
    targets = {"flowrl-reward": ports["reward"], "flowrl-sampler": ports["sampler"],
               "flowrl-reward-worker": ports["worker"], "flowrl-trainer": ports["trainer"],
               "flowrl-preview": ports["preview"], "prometheus": ports["prometheus"]}
    prom_config = live_config({job: f"127.0.0.1:{port}" for job, port in targets.items()})
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
    base = f"http://127.0.0.1:{ports['prometheus']}"
    try:
        with ProcessGroup(tmp_path, queue_env) as procs:
            procs.start("prometheus", [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{ports['prometheus']}"])
            procs.start("reward-server", [sys.executable, "-m", "services.reward.cli", "--rewards", "brightness",
                                          "--port", str(ports["reward"]), "--log-level", "warning"])
            procs.start("sampler", FLOWRL + ["worker", "sampler", "--name", f"s-{ns}",
                                             "--http-port", str(ports["sampler"])])
            procs.start("reward-worker", FLOWRL + ["worker", "reward", "--name", f"r-{ns}",
                                                   "--http-port", str(ports["worker"])])
            procs.start("preview", [sys.executable, "-m", "services.sampler.cli", "--config", str(config),
                                    "--port", str(ports["preview"]), "--log-level", "warning"])
            procs.wait_http("prometheus", f"{base}/-/ready")
            procs.wait_http("reward-server", f"http://127.0.0.1:{ports['reward']}/v2/health/ready")
            procs.wait_http("sampler", f"http://127.0.0.1:{ports['sampler']}/health/ready")
            procs.wait_http("reward-worker", f"http://127.0.0.1:{ports['worker']}/health/ready")
            procs.wait_http("preview", f"http://127.0.0.1:{ports['preview']}/health/ready")
            r = httpx.post(f"http://127.0.0.1:{ports['preview']}/v1/generate",
                           json={"prompts": ["a photo of a circle"]}, timeout=120)
            assert r.status_code == 200, r.text
            for name in ("sampler", "reward-worker"):
                procs.wait_log(name, "ready.")
            trainer = procs.start("trainer", FLOWRL + [
                "trainer", str(config), "--set", f"output_dir={tmp_path / 'runs'}",
                "--set", f"metrics_port={ports['trainer']}"])
            deadline, problems = time.monotonic() + 420, ["not polled yet"]
            while problems and trainer.poll() is None and time.monotonic() < deadline:
                time.sleep(2)
                problems = missing_data(base, checked, list(targets))
            assert not problems, (
                f"after {'the trainer exited' if trainer.poll() is not None else 'the deadline'}, "
                f"Prometheus still lacks:\n" + "\n".join(problems) + "\n" + procs.logs())
    finally:
        state = RunState.connect(redis_url, "promlive", ns)
        state.clear()
        delete_namespace_queues(state.redis, ns)
