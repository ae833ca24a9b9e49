"""Several trainer processes in the distributed mode, with real processes on this machine:
``accelerate launch --multi_gpu --num_processes 2 -m trainer.cli trainer`` (torchrun: 2 CPU processes
with gloo, as in ``tests/trainer/test_multiprocess.py``) against a sampler worker and a reward worker
(Celery, the real Redis).

Checks: each trainer process dispatched exactly its own share of every epoch's prompt groups and got
their scores back on its own Redis list (its own ledger), every sample id is used exactly once over
both, DDP kept the weights identical on both, and the run reproduces the embedded one-process run of
the same config (per-sample seeds: the same samples, the same rewards, the same update)."""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections import defaultdict

import pytest
import yaml

from shared.config import load_config
from shared.queue import RunState, delete_namespace_queues
from tests.helpers.procs import FLOWRL, ProcessGroup, free_port
from tests.helpers.tiny import tiny_raw

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

EPOCHS, GROUPS, K, WORLD = 2, 4, 8, 2


def ledger(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def queue_env(redis_url: str, ns: str, tmp_path) -> dict[str, str]:
    """The FLOWRL_QUEUE_* settings of a test's workers and trainers: namespace ``ns``, blobs under ``tmp_path``."""
    return {"FLOWRL_QUEUE_BROKER_URL": redis_url, "FLOWRL_QUEUE_NAMESPACE": ns, "FLOWRL_QUEUE_KEY_PREFIX": ns,
            "FLOWRL_QUEUE_STORE_URL": f"file://{tmp_path}/blobs", "FLOWRL_QUEUE_TASK_TIME_LIMIT_S": "300",
            "FLOWRL_QUEUE_COLLECT_TIMEOUT_S": "400", "FLOWRL_QUEUE_POLICY_WAIT_S": "300", "OMP_NUM_THREADS": "1"}


def start_workers(procs: ProcessGroup, ns: str) -> None:
    """A sampler and a reward worker, ready."""
    procs.start("sampler", FLOWRL + ["worker", "sampler", "--name", f"s-{ns}"])
    procs.start("reward-worker", FLOWRL + ["worker", "reward", "--name", f"r-{ns}"])
    for name in ("sampler", "reward-worker"):
        procs.wait_log(name, "ready.")


def launch(processes: int, config, *sets: str) -> list[str]:
    """``flowrl trainer config`` on ``processes`` CPU processes (accelerate launch), with ``--set``s."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "trainer.cli", "trainer", str(config),
            *[a for s in sets for a in ("--set", s)]]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_trainer_processes_share_the_epoch_and_match_one(tmp_path, redis_url, fsdp):
    """With ``fsdp`` the trainer processes shard the transformer (``train.fsdp``): every process
    takes part in gathering the weights rank 0 publishes to the sampler."""
    ns = f"mt-{uuid.uuid4().hex[:8]}"
    raw = tiny_raw(tmp_path, "grpo")
    # one optimizer step per epoch over the whole global batch, so both layouts take the same step
    raw["train"].update(max_epochs=EPOCHS, clip_range=1e-3, per_device_batch_size=K, gradient_step_per_epoch=1)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    try:
        with ProcessGroup(tmp_path, queue_env(redis_url, ns, tmp_path)) as procs:
            start_workers(procs, ns)
            trainer = procs.start("trainer", launch(WORLD, config, "run_name=two", f"train.fsdp={str(fsdp).lower()}"))
            assert trainer.wait(timeout=800) == 0, procs.logs()
            logs = procs.logs()
    finally:
        state = RunState.connect(redis_url, "two", ns)
        state.clear()
        delete_namespace_queues(state.redis, ns)

    run = tmp_path / "runs" / "two"
    assert (run / "rank1_state.json").is_file(), "the launcher started only one process"
    mine = [ledger(run / "scored_samples.jsonl"), ledger(run / "scored_samples.rank1.jsonl")]
    # every sample id of every epoch used exactly once, over both processes
    ids = [row["sample_id"] for rows in mine for row in rows]
    assert len(ids) == len(set(ids)) == EPOCHS * GROUPS * K, logs
    # each process trained exactly its own groups (plan_epoch's share), half of every epoch's
    from trainer.collect import plan_epoch
    from trainer.data import load_prompts

    cfg = load_config(config)
    rows, _ = load_prompts(cfg.data.dataset_dir, None)
    for rank, rows_of_rank in enumerate(mine):
        got = defaultdict(set)
        for row in rows_of_rank:
            got[row["epoch"]].add(int(re.search(r"/g(\d+)/k\d+$", row["sample_id"]).group(1)))
        for epoch in range(EPOCHS):
            assert got[epoch] == set(plan_epoch(cfg, rows, epoch, rank, WORLD).group_ids), (rank, epoch)
    # DDP kept the weights identical; rank 0 alone published, one version per epoch
    ranks = [json.loads((run / f"rank{r}_state.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["policy_version"] == EPOCHS and summary["samples"] == EPOCHS * GROUPS * K
    assert summary["duplicates_dropped"] == 0 and summary["world_size"] == WORLD

    # the embedded one-process run of the same config: the same samples, rewards and update
    from trainer.loop import train

    one = train(load_config(config, ["run_name=one"]), quiet=True)
    assert one["transport"] == "local" and summary["transport"] == "celery"
    key = "train/reward/brightness"
    two_r = [m[key] for m in ledger(run / "metrics.jsonl") if key in m]
    one_r = [m[key] for m in ledger(tmp_path / "runs" / "one" / "metrics.jsonl") if key in m]
    assert len(two_r) == len(one_r) == EPOCHS
    assert abs(two_r[0] - one_r[0]) < 1e-5  # epoch 1: the base weights, the same seeds
    assert abs(two_r[1] - one_r[1]) < 1e-3
    ones = json.loads((tmp_path / "runs" / "one" / "rank0_state.json").read_text())
    assert abs(ones["param_abs_sum"] - ranks[0]["param_abs_sum"]) < 1e-3 * ones["param_abs_sum"]
    if fsdp:  # each trainer process held half of the transformer
        assert all(r["transformer_bytes"] <= 0.55 * ones["transformer_bytes"] for r in ranks)


def test_a_context_parallel_group_trains_from_the_queue_as_one_process(tmp_path, redis_url):
    """``train.context_parallel: 2`` on 2 trainer processes (one data rank) against a sampler and a reward
    worker: the group's first process dispatches and collects (one ledger), sends each epoch's samples to
    the other, and the run trains what one trainer process trains from the same queue."""
    from safetensors.torch import load_file

    from tests.trainer.test_context_parallel import adam_rounding
    from tests.trainer.test_fsdp import family_config

    ns = f"cp-{uuid.uuid4().hex[:8]}"
    config = family_config(tmp_path, "wan2_t2v", {}, trainer_type="grpo", max_epochs=2, kl_beta=0.1)
    raw = yaml.safe_load(config.read_text())
    del raw["queue"]  # (the dump's defaults): the FLOWRL_QUEUE_* settings below, as the workers have them
    config.write_text(yaml.safe_dump(raw))
    try:
        with ProcessGroup(tmp_path, queue_env(redis_url, ns, tmp_path)) as procs:
            start_workers(procs, ns)
            trainer = procs.start("trainer", launch(2, config, "run_name=cp", "train.context_parallel=2"))
            assert trainer.wait(timeout=800) == 0, procs.logs()
            one = procs.start("one", FLOWRL + ["trainer", str(config), "--set", "run_name=one"])
            assert one.wait(timeout=800) == 0, procs.logs()
    finally:
        for name in ("cp", "one"):
            RunState.connect(redis_url, name, ns).clear()
        delete_namespace_queues(RunState.connect(redis_url, "cp", ns).redis, ns)

    run = tmp_path / "runs" / "cp"
    assert not (run / "scored_samples.rank1.jsonl").exists()  # the group's one data rank talks to the queue
    used = [row["sample_id"] for row in ledger(run / "scored_samples.jsonl")]
    assert len(used) == len(set(used)) == 2 * 2 * 2  # epochs x groups x group size, each once
    summary = json.loads((run / "summary.json").read_text())
    assert summary["transport"] == "celery" and summary["samples"] == 8 and summary["duplicates_dropped"] == 0

    name = "checkpoints/final/lora/pytorch_lora_weights.safetensors"
    a, b = load_file(run / name), load_file(tmp_path / "runs" / "one" / name)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3  # it trained
    assert adam_rounding(a, b, lr=1e-2) is None
    for key in ("train/reward/brightness", "train/grad_norm", "train/kl"):
        cp_m, one_m = ([m[key] for m in ledger(r / "metrics.jsonl") if key in m] for r in (run, tmp_path / "runs" / "one"))
        assert len(cp_m) == len(one_m) == 2, key
        assert all(abs(a - b) <= 1e-4 * max(abs(b), 1e-3) for a, b in zip(cp_m, one_m)), (key, cp_m, one_m)
