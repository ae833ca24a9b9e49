"""The distributed mode end to end, with real processes on this machine: a reward server under
uvicorn, two sampler workers and a reward worker (Celery, against the real Redis), and the
trainer (`flowrl trainer`), training the toy pipeline for a few epochs with max_staleness 1.

Checks: every sample id of every epoch is used exactly once, the policy version advances and
samples carry the version they were drawn with (lag <= 1), the training reward rises, both
sampler workers did work, and the sample count equals the embedded run's for the same config.
"""

from __future__ import annotations

import json
import sys
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.config import RewardSpec, load_config
from shared.queue import RunState, delete_namespace_queues
from tests.helpers.procs import FLOWRL, ProcessGroup, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

EPOCHS, GROUPS, K = 4, 2, 4
CONFIG = f"""
run_name: dist
logging_backend: none
model: {{model_type: sd3-5, model_name_or_path: assets/toy-sd3, finetune_type: lora, lora_rank: 8}}
data: {{dataset_dir: examples/data/toy}}
train:
  trainer_type: nft
  num_train_timesteps: 2
  learning_rate: 3.0e-3
  resolution: 64
  num_inference_steps: 6
  group_size: {K}
  unique_sample_num_per_epoch: {GROUPS}
  per_device_batch_size: {K}
  max_epochs: {EPOCHS}
  max_staleness: 1
  seed: 0
eval: {{num_inference_steps: 6, eval_freq: 0, num_prompts: 4, per_device_batch_size: 4}}
rewards:
  - {{name: brightness, reward_model: remote, url: "URL", protocol: v2, timeout: 30, retries: 5, backoff: 0.2}}
"""


def test_trainer_samplers_reward_worker_and_server(tmp_path, redis_url):
    ns = f"test-{uuid.uuid4().hex[:8]}"
    queue_env = {"FLOWRL_QUEUE_BROKER_URL": redis_url, "FLOWRL_QUEUE_NAMESPACE": ns,
                 "FLOWRL_QUEUE_KEY_PREFIX": ns, "FLOWRL_QUEUE_STORE_URL": f"file://{tmp_path}/blobs",
                 "FLOWRL_QUEUE_TASK_TIME_LIMIT_S": "300", "FLOWRL_QUEUE_COLLECT_TIMEOUT_S": "400",
                 "FLOWRL_QUEUE_POLICY_WAIT_S": "300", "OMP_NUM_THREADS": "1"}
    port, sampler_port = free_port(), free_port()
    config = tmp_path / "dist.yaml"
    config.write_text(CONFIG.replace("URL", f"http://127.0.0.1:{port}"))
    try:
        with ProcessGroup(tmp_path, queue_env) as procs:
            procs.start("reward-server", [sys.executable, "-m", "services.reward.cli", "--rewards",
                                          "brightness", "--port", str(port), "--log-level", "warning"])
            procs.start("sampler-1", FLOWRL + ["worker", "sampler", "--name", f"s1-{ns}",
                                               "--http-port", str(sampler_port)])
            procs.start("sampler-2", FLOWRL + ["worker", "sampler", "--name", f"s2-{ns}"])
            procs.start("reward-worker", FLOWRL + ["worker", "reward", "--name", f"r1-{ns}"])
            procs.wait_http("reward-server", f"http://127.0.0.1:{port}/v2/health/ready")
            procs.wait_http("sampler-1", f"http://127.0.0.1:{sampler_port}/health/ready")
            for name in ("sampler-1", "sampler-2", "reward-worker"):
                procs.wait_log(name, "ready.")
            trainer = procs.start("trainer", FLOWRL + ["trainer", str(config), "--set",
                                                       f"output_dir={tmp_path / 'runs'}"])
            assert trainer.wait(timeout=800) == 0, procs.logs()
            logs = procs.logs()
            scrape = httpx.get(f"http://127.0.0.1:{sampler_port}/metrics").text
    finally:
        state = RunState.connect(redis_url, "dist", ns)
        state.clear()
        delete_namespace_queues(state.redis, ns)

    run = tmp_path / "runs" / "dist"
    summary = json.loads((run / "summary.json").read_text())
    ledger = [json.loads(line) for line in (run / "scored_samples.jsonl").read_text().splitlines()]
    # every sample id of every epoch used exactly once
    ids = [row["sample_id"] for row in ledger]
    assert len(ids) == len(set(ids)) == EPOCHS * GROUPS * K, logs
    assert summary["duplicates_dropped"] == 0  # no task ran twice, so each id was scored once
    assert {row["epoch"] for row in ledger} == set(range(EPOCHS))
    # the policy version advances; every sample lags the trained version by at most 1
    assert summary["policy_version"] == EPOCHS
    for row in ledger:
        assert row["epoch"] - 1 <= row["policy_version"] <= row["epoch"], row
    assert max(row["policy_version"] for row in ledger) >= EPOCHS - 2
    # both samplers worked, scores came through the reward worker from the server
    assert {row["sampler"] for row in ledger} == {f"s1-{ns}", f"s2-{ns}"}, logs
    assert {row["scorer"] for row in ledger} == {f"r1-{ns}"}
    # sampler-1's metrics endpoint counts what its pool process sampled
    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    mine = sum(row["sampler"] == f"s1-{ns}" for row in ledger)
    (total,) = [s.value for s in families["flowrl_sampler_samples"].samples if s.name.endswith("_total")]
    assert total >= mine > 0
    assert families["flowrl_sampler_policy_version"].samples[0].value >= EPOCHS - 2
    # the reward rises (brightness: mean of the last epoch above the first)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["train/reward/brightness"] for m in metrics if "train/reward/brightness" in m]
    assert len(rewards) == EPOCHS and rewards[-1] > rewards[0], rewards

    # the embedded run of the same config trains on the same number of samples
    from trainer.loop import train

    cfg = load_config(config, [f"output_dir={tmp_path / 'embedded'}"])
    cfg.rewards[0] = RewardSpec(name="brightness", reward_model="brightness")  # scored in-process
    embedded = train(cfg, quiet=True)
    assert embedded["transport"] == "local" and summary["transport"] == "celery"
    assert embedded["samples"] == summary["samples"] == EPOCHS * GROUPS * K
