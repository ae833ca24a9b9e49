"""Transports without workers: the local transport's one-step staleness, and the Celery
transport's collection logic (exactly one score per sample id, later-epoch batches kept for
later, dead letters and timeouts that say what is missing) driven by hand-made messages."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from shared.models import load_adapter
from services.sampler.runtime import write_trajectory
from shared.protocol import DeadLetter, SampleJob, ScoredBatch
from shared.queue import RunState, delete_namespace_queues
from shared.sampling import rollout_batches
from tests.helpers.tiny import tiny_config
from trainer.algorithms import ALGORITHMS
from trainer.collect import plan_epoch
from trainer.data import load_prompts
from trainer.loop import train
from trainer.policy import Policy, attach_trainable
from trainer.transport import CeleryTransport, CollectError

FAST = ["train.num_inference_steps=4", "eval.num_inference_steps=4", "train.group_size=2",
        "train.unique_sample_num_per_epoch=2", "train.per_device_batch_size=2",
        "train.gradient_step_per_epoch=1"]


def test_local_max_staleness_one_trains_on_samples_one_version_old(tmp_path):
    cfg = tiny_config(tmp_path, overrides=FAST + ["train.max_epochs=3", "train.max_staleness=1"])
    summary = train(cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "tiny_grpo" / "metrics.jsonl").read_text().splitlines()]
    lags = [r["queue/policy_lag"] for r in rows if "queue/policy_lag" in r]
    assert lags == [0.0, 1.0, 1.0]  # epoch 0 is sampled before any update
    assert summary["policy_version"] == 3 and summary["samples"] == 3 * 2 * 2


@pytest.fixture
def celery_setup(tmp_path, redis_url):
    ns = f"tt-{uuid.uuid4().hex[:8]}"
    cfg = tiny_config(tmp_path, overrides=FAST + [f"queue.broker_url={redis_url}", f"queue.namespace={ns}",
                                                  f"queue.key_prefix={ns}", f"queue.store_url=memory://{ns}",
                                                  "queue.collect_timeout_s=1.5", "transport=celery"])
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    transport = CeleryTransport(cfg, adapter, policy, ALGORITHMS.get("grpo")(cfg), "run1", run_dir=tmp_path)
    rows, _ = load_prompts(cfg.data.dataset_dir, None)
    yield cfg, adapter, transport, rows
    transport.state.clear()
    delete_namespace_queues(transport.state.redis, ns)
    transport.close()


def scored_for(cfg, adapter, transport, pending, job_id, reward=0.5) -> ScoredBatch:
    """What samplers + a reward worker would return for one dispatched job (sampled here)."""
    job = SampleJob.model_validate_json(
        next(m for m in transport.sent if SampleJob.model_validate_json(m).job_id == job_id))
    items = job.items
    _, roll = rollout_batches(adapter, [i.prompt for i in items], [None] * len(items), [i.seed for i in items],
                              batch_size=8, resolution=(16, 16), num_steps=4, guidance_scale=1.0,
                              dynamics=job.params.dynamics, noise_level=job.params.noise_level,
                              sde_steps=job.params.sde_steps, keep_means=False, log_prob_reduction="mean",
                              transformer=adapter.transformer)
    traj = write_trajectory(transport.store, job, roll, 0, worker="s")
    return ScoredBatch(trajectory=traj, rewards={"brightness": [reward] * len(items)}, worker="r")


@pytest.fixture
def capture(monkeypatch):
    def install(transport):
        transport.sent = []
        monkeypatch.setattr(transport.app, "send_task", lambda name, args, queue: transport.sent.append(args[0]))
    return install


def test_each_sample_id_is_used_once_and_later_epochs_wait(celery_setup, capture):
    cfg, adapter, transport, rows = celery_setup
    capture(transport)
    p0, p1 = plan_epoch(cfg, rows, 0, 0, 1), plan_epoch(cfg, rows, 1, 0, 1)
    pend0, pend1 = transport.dispatch(p0, 0), transport.dispatch(p1, 0)
    assert sorted(pend0.jobs) == ["run1/e0/j0", "run1/e0/j1"] and len(transport.sent) == 4
    b0 = [scored_for(cfg, adapter, transport, pend0, j, reward=r) for j, r in zip(pend0.jobs, (0.1, 0.2))]
    b1 = [scored_for(cfg, adapter, transport, pend1, j) for j in pend1.jobs]
    state: RunState = transport.state
    # arrival order: an epoch-1 batch first, then epoch 0 with one batch delivered twice
    for b in (b1[0], b0[1], b0[1], b0[0]):
        state.push_scored(b)
    s0 = transport.collect(pend0)
    assert s0.rewards["brightness"].tolist() == pytest.approx([0.1, 0.1, 0.2, 0.2])
    assert s0.rollout.latents.shape[0] == 4 and transport.duplicates == 2  # counted per sample
    state.push_scored(b0[0])  # a late redelivery of an epoch already trained
    state.push_scored(b1[1])
    s1 = transport.collect(pend1)
    assert len(s1.rewards["brightness"]) == 4 and transport.duplicates == 4
    ledger = [json.loads(x) for x in (transport.ledger).read_text().splitlines()]
    assert len({r["sample_id"] for r in ledger}) == len(ledger) == 8


def dead_letter(transport, pend, job: str, error: str = "CUDA out of memory") -> None:
    transport.state.dead_letter(DeadLetter(run_id="run1", task="flowrl.sample", job_id=job,
                                           sample_ids=pend.jobs[job], attempts=3, error=error))


def test_a_dead_letter_drops_its_prompt_groups_and_the_rest_trains(celery_setup, capture):
    cfg, adapter, transport, rows = celery_setup
    capture(transport)
    pend = transport.dispatch(plan_epoch(cfg, rows, 0, 0, 1), 0)
    dead_letter(transport, pend, "run1/e0/j1")
    transport.state.push_scored(scored_for(cfg, adapter, transport, pend, "run1/e0/j0", reward=0.3))
    samples = transport.collect(pend)
    assert samples.rows == [0, 1]  # group 0 kept, group 1 (the dead job's) dropped
    assert samples.rewards["brightness"].tolist() == pytest.approx([0.3, 0.3])
    assert samples.rollout.latents.shape[0] == 2 and samples.metrics["queue/dropped_samples"] == 2
    (letter,) = [json.loads(x) for x in (transport.dead_letter_log).read_text().splitlines()]
    assert letter["dropped_samples"] == pend.jobs["run1/e0/j1"] and letter["dropped_groups"] == [1]
    assert letter["error"] == "CUDA out of memory" and letter["epoch"] == 0
    ledger = [json.loads(x)["sample_id"] for x in transport.ledger.read_text().splitlines()]
    assert ledger == pend.jobs["run1/e0/j0"]


def test_every_group_dead_lettered_stops_the_epoch(celery_setup, capture):
    cfg, adapter, transport, rows = celery_setup
    capture(transport)
    pend = transport.dispatch(plan_epoch(cfg, rows, 0, 0, 1), 0)
    for job in pend.jobs:
        dead_letter(transport, pend, job)
    with pytest.raises(CollectError, match="every prompt group was dropped"):
        transport.collect(pend)


def test_on_dead_letter_stop_raises_with_the_tasks_error(celery_setup, capture):
    cfg, adapter, transport, rows = celery_setup
    capture(transport)
    transport.cfg.queue.on_dead_letter = "stop"
    pend = transport.dispatch(plan_epoch(cfg, rows, 0, 0, 1), 0)
    dead_letter(transport, pend, "run1/e0/j1")
    with pytest.raises(CollectError, match=r"job run1/e0/j1 was dead-lettered after 3 .*CUDA out of "
                                           r"memory. Samples lost: run1/e0/g1/k0, run1/e0/g1/k1"):
        transport.collect(pend)


def test_a_silent_queue_times_out_with_a_hint(celery_setup, capture):
    cfg, adapter, transport, rows = celery_setup
    capture(transport)
    pend = transport.dispatch(plan_epoch(cfg, rows, 0, 0, 1), 0)
    with pytest.raises(CollectError, match=r"4 of 4 samples not scored .* Are sampler workers consuming"):
        transport.collect(pend)
    transport.state.redis.rpush(cfg.queue.queue("sample"), "a", "b")  # what the metrics report
    assert transport.queue_depths() == {"sample": 2, "reward": 0}


def test_trainer_metrics_endpoint_reports_the_epochs(tmp_path):
    """`metrics_port` serves the trainer's Prometheus metrics while it trains (checked after
    the run through the same registry the endpoint serves, and once over HTTP during it)."""
    import threading

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from tests.helpers.procs import free_port
    from trainer import metrics as trainer_metrics

    port = free_port()
    seen: list[str] = []
    original = trainer_metrics.TrainerMetrics.observe_epoch

    def observe_and_scrape(self, metrics, samples, transport):
        original(self, metrics, samples, transport)
        seen.append(httpx.get(f"http://127.0.0.1:{port}/metrics").text)

    trainer_metrics.TrainerMetrics.observe_epoch = observe_and_scrape
    try:
        cfg = tiny_config(tmp_path, overrides=FAST + ["train.max_epochs=2", f"metrics_port={port}"])
        train(cfg, quiet=True)
    finally:
        trainer_metrics.TrainerMetrics.observe_epoch = original
    assert len(seen) == 2
    values = {s.name + str(sorted(s.labels.items())): s.value
              for f in text_string_to_metric_families(seen[-1]) for s in f.samples}
    assert values["flowrl_trainer_policy_version[]"] == 2
    assert values["flowrl_trainer_samples_total[]"] == 2 * 2 * 2
    assert values["flowrl_trainer_epoch_seconds_count[]"] == 2
    assert values["flowrl_trainer_optimize_seconds_count[]"] == 2
    assert 0 < values["flowrl_trainer_optimize_seconds_sum[]"] <= values["flowrl_trainer_epoch_seconds_sum[]"]
    assert values["flowrl_trainer_optimizer_steps_total[]"] == json.loads(
        (tmp_path / "runs" / "tiny_grpo" / "summary.json").read_text())["optimizer_steps"] > 0
    assert 0 <= values["flowrl_trainer_reward[('reward', 'brightness')]"] <= 1
    assert "flowrl_trainer_loss[]" in values and values["flowrl_trainer_dead_letters_total[]"] == 0
    assert not any(t.name.startswith("prometheus") for t in threading.enumerate() if not t.daemon)
    with pytest.raises(httpx.HTTPError):  # the endpoint stops with the run
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_redis_lost_mid_dispatch_resends_the_jobs_it_had_already_sent(celery_setup, monkeypatch):
    """Redis restarts empty while job 1 of an epoch is being sent: job 0 (sent before, now lost
    with Redis) is sent again once Redis is back; job 1 is sent once (after the outage)."""
    import redis

    cfg, adapter, transport, rows = celery_setup
    cfg.queue.redis_outage_s = 30
    sent: list[str] = []
    outage = {"left": 2}  # the first two attempts at job 1 fail

    def send_task(name, args, queue):
        job = SampleJob.model_validate_json(args[0]).job_id
        if job.endswith("/j1") and outage["left"]:
            outage["left"] -= 1
            transport.state.redis.delete(transport.state.keys.alive)  # Redis came back empty
            raise redis.exceptions.ConnectionError("Connection refused")
        sent.append(job)

    monkeypatch.setattr(transport.app, "send_task", send_task)
    monkeypatch.setattr("trainer.transport.time.sleep", lambda s: None)
    transport.publish(0)
    transport.dispatch(plan_epoch(cfg, rows, 0, 0, 1), 0)
    assert sent == ["run1/e0/j0", "run1/e0/j1", "run1/e0/j0"]  # j1 sent, then the recovery resent j0
    assert transport.state.marked(transport.token) and transport.state.policy().version == 0


@pytest.fixture
def two_ranks(tmp_path, redis_url, capture):
    """Two trainer processes' transports of one run (world size 2) in this process; rank 0's
    ``agree`` returns the fewest of its count and ``fewest_of_rank1`` (what the collective would)."""
    ns = f"tt-{uuid.uuid4().hex[:8]}"
    cfg = tiny_config(tmp_path, overrides=FAST + [f"queue.broker_url={redis_url}", f"queue.namespace={ns}",
                                                  f"queue.key_prefix={ns}", f"queue.store_url=memory://{ns}",
                                                  "queue.collect_timeout_s=1.5", "transport=celery",
                                                  "train.unique_sample_num_per_epoch=4"])
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    counts: dict[int, int] = {}
    barriers = []

    def make(rank: int) -> CeleryTransport:
        def agree(n: int) -> int:
            counts[rank] = n
            return min(counts.values())
        t = CeleryTransport(cfg, adapter, policy, ALGORITHMS.get("grpo")(cfg), "run1", world_size=2, rank=rank,
                            barrier=lambda: barriers.append(rank), agree=agree, run_dir=tmp_path)
        capture(t)
        return t

    ranks = [make(0), make(1)]
    rows, _ = load_prompts(cfg.data.dataset_dir, None)
    yield cfg, adapter, ranks, rows, counts
    assert barriers == [0, 1]
    ranks[0].state.clear()
    delete_namespace_queues(ranks[0].state.redis, ns)
    for t in ranks:
        t.close()


def test_each_trainer_process_sends_its_own_jobs_and_gets_its_own_scores(two_ranks):
    cfg, adapter, (t0, t1), rows, _ = two_ranks
    plans = [plan_epoch(cfg, rows, 0, r, 2) for r in (0, 1)]
    pend = [t.dispatch(p, 0) for t, p in zip((t0, t1), plans)]
    for rank, (t, p) in enumerate(zip((t0, t1), pend)):
        jobs = [SampleJob.model_validate_json(m) for m in t.sent]
        assert sorted(p.jobs) == [f"run1/e0/r{rank}/j0", f"run1/e0/r{rank}/j1"]
        assert {j.trainer_rank for j in jobs} == {rank}
        assert {i.group_id for j in jobs for i in j.items} == set(plans[rank].group_ids)
    # rank 0 alone publishes; both mark themselves alive, each under its own key
    t0.publish(0)
    assert t1.publish(1) is None and t0.state.policy().version == 0
    assert t0.state.marked(t0.token) and t1.state.marked(t1.token) and not t0.state.marked(t1.token)
    # a reward worker pushes every batch to its trainer's list: rank 1's first, rank 0 sees none of them
    for t, p in ((t1, pend[1]), (t0, pend[0])):
        for job in p.jobs:
            t0.state.push_scored(scored_for(cfg, adapter, t, p, job, reward=0.1 + t.rank))
    s0, s1 = t0.collect(pend[0]), t1.collect(pend[1])
    assert s0.rewards["brightness"].tolist() == pytest.approx([0.1] * 4)
    assert s1.rewards["brightness"].tolist() == pytest.approx([1.1] * 4)
    assert t0.duplicates == t1.duplicates == 0
    for t, p, name in ((t0, pend[0], "scored_samples.jsonl"), (t1, pend[1], "scored_samples.rank1.jsonl")):
        assert t.ledger.name == name
        assert [json.loads(x)["sample_id"] for x in t.ledger.read_text().splitlines()] == p.ids
    # each process collects its own blobs
    assert t1.epoch_done(0) > 0 and t0.epoch_done(0) > 0


def test_a_group_lost_on_one_process_trims_every_process_to_the_same_count(two_ranks):
    cfg, adapter, (t0, t1), rows, counts = two_ranks
    pend = [t.dispatch(plan_epoch(cfg, rows, 0, r, 2), 0) for r, t in enumerate((t0, t1))]
    dead_letter(t1, pend[1], "run1/e0/r1/j1")
    for t, p in zip((t0, t1), pend):
        for job in p.jobs:
            if job != "run1/e0/r1/j1":
                t0.state.push_scored(scored_for(cfg, adapter, t, p, job))
    s1 = t1.collect(pend[1])  # rank 1 lost group 3: 2 samples left
    assert s1.rows == [0, 1] and counts[1] == 2
    s0 = t0.collect(pend[0])  # rank 0 has all 4, and trains 2 like rank 1 (DDP lockstep)
    assert s0.rows == [0, 1] and s0.rollout.latents.shape[0] == 2
    assert s0.metrics["queue/dropped_samples"] == 2
    ledger = [json.loads(x)["sample_id"] for x in t0.ledger.read_text().splitlines()]
    assert ledger == pend[0].jobs["run1/e0/r0/j0"]  # the trimmed group is not recorded as trained


def test_every_group_lost_on_one_process_stops_every_process(two_ranks):
    cfg, adapter, (t0, t1), rows, counts = two_ranks
    pend = [t.dispatch(plan_epoch(cfg, rows, 0, r, 2), 0) for r, t in enumerate((t0, t1))]
    for job in pend[1].jobs:
        dead_letter(t1, pend[1], job)
    for job in pend[0].jobs:
        t0.state.push_scored(scored_for(cfg, adapter, t0, pend[0], job))
    with pytest.raises(CollectError, match="every prompt group of this trainer process's share was dropped"):
        t1.collect(pend[1])
    with pytest.raises(CollectError, match="every prompt group of another trainer process's share was dropped"):
        t0.collect(pend[0])


def test_jobs_and_their_trajectories_carry_each_samples_source(tmp_path, redis_url, capture):
    """data.datasets in the distributed mode: every SampleItem names its sample's source, and the
    sampler's trajectory passes them on to the reward worker (rewards[].datasets routing)."""
    from shared.config import apply_overrides, parse_config
    from tests.helpers.tiny import tiny_raw
    from trainer.data import load_dataset

    ns = f"tt-{uuid.uuid4().hex[:8]}"
    raw = apply_overrides(tiny_raw(tmp_path), FAST + [f"queue.broker_url={redis_url}", f"queue.namespace={ns}",
                                                      f"queue.key_prefix={ns}", f"queue.store_url=memory://{ns}",
                                                      "transport=celery", "train.unique_sample_num_per_epoch=4"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.txt").write_text("a photo of a cat\na photo of a dog\n")
    raw["data"] = {"datasets": [{"name": "a", "dataset_dir": str(tmp_path / "data")},
                                {"name": "b", "dataset_dir": str(other)}]}
    cfg = parse_config(raw)
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    transport = CeleryTransport(cfg, adapter, policy, ALGORITHMS.get("grpo")(cfg), "run1", run_dir=tmp_path)
    try:
        capture(transport)
        plan = plan_epoch(cfg, load_dataset(cfg.data)[0], 0, 0, 1)
        assert sorted(set(plan.datasets)) == ["a", "b"]
        pend = transport.dispatch(plan, 0)
        jobs = [SampleJob.model_validate_json(m) for m in transport.sent]
        assert [i.dataset for j in jobs for i in j.items] == plan.datasets
        batch = scored_for(cfg, adapter, transport, pend, jobs[0].job_id)
        assert batch.trajectory.datasets == [i.dataset for i in jobs[0].items]
    finally:
        transport.state.clear()
        delete_namespace_queues(transport.state.redis, ns)
        transport.close()


def test_prometheus_counts_every_trainer_process_duplicates():
    """The duplicates counter follows the epoch's ``queue/duplicates_total`` (summed over trainer
    processes), not the main process's own transport, and counts each duplicate once."""
    from types import SimpleNamespace

    from trainer.metrics import TrainerMetrics

    prom = TrainerMetrics()
    transport = SimpleNamespace(duplicates=1, dead_letters_seen=0, queue_depths=dict)  # rank 0's own count
    row = {"train/policy_version": 1, "time/epoch_seconds": 1.0, "time/optimize_seconds": 0.5,
           "train/optimizer_step": 1}
    prom.observe_epoch({**row, "queue/duplicates_total": 3.0}, 4, transport)
    prom.observe_epoch({**row, "train/optimizer_step": 2, "queue/duplicates_total": 5.0}, 4, transport)
    assert prom.registry.get_sample_value("flowrl_trainer_duplicate_scores_total") == 5
    prom.observe_epoch({**row, "train/optimizer_step": 3}, 4, transport)  # no queue metric: the transport's
    assert prom.registry.get_sample_value("flowrl_trainer_duplicate_scores_total") == 5  # (1, already counted)


def test_dead_letters_written_after_redis_lost_the_run_are_read(celery_setup, capture):
    """Redis restarted empty: the run's dead-letter list starts again, and the letters written after it
    are read (the count of letters seen before was used as an offset into the new list, so the first
    ones were skipped and the epoch waited queue.collect_timeout_s)."""
    cfg, adapter, transport, rows = celery_setup
    capture(transport)
    first = transport.dispatch(plan_epoch(cfg, rows, 0, 0, 1), 0)
    dead_letter(transport, first, "run1/e0/j1")
    transport.state.push_scored(scored_for(cfg, adapter, transport, first, "run1/e0/j0"))
    assert transport.collect(first).rows == [0, 1] and transport.dead_letters_seen == 1
    second = transport.dispatch(plan_epoch(cfg, rows, 1, 0, 1), 1)
    transport.state.clear()  # Redis restarted without persistence (this run's keys only)
    transport._recover()  # (what the first Redis call after the outage runs)
    dead_letter(transport, second, "run1/e1/j1")
    transport.state.push_scored(scored_for(cfg, adapter, transport, second, "run1/e1/j0"))
    assert transport.collect(second).rows == [0, 1]


def test_rows_another_process_cut_are_not_kept_loaded(celery_setup, capture):
    """Rows trimmed to the fewest any process has are read but not trained: their trajectories are let
    go with the epoch's (they stayed loaded, one more per epoch)."""
    cfg, adapter, transport, rows = celery_setup
    capture(transport)
    transport.agree = lambda n: n - 2  # another trainer process lost a group
    for epoch in range(3):
        pending = transport.dispatch(plan_epoch(cfg, rows, epoch, 0, 1), epoch)
        for job in pending.jobs:
            transport.state.push_scored(scored_for(cfg, adapter, transport, pending, job))
        transport.collect(pending)
        transport.epoch_done(epoch)
        assert transport.loaded == {}


def test_a_resumed_trainer_ignores_what_its_earlier_start_left(celery_setup, capture, tmp_path):
    """The trainer died after a task was dead-lettered (on_dead_letter: stop) and another finished; the
    resumed one (a new start: a new generation) dispatches the epoch again. The earlier start's letter
    stopped the resumed run at once, and its trajectory (the dead trainer's weights) was trained."""
    cfg, adapter, transport, rows = celery_setup
    capture(transport)
    cfg.queue.on_dead_letter = "stop"
    first = transport.dispatch(plan_epoch(cfg, rows, 0, 0, 1), 0)
    late = scored_for(cfg, adapter, transport, first, "run1/e0/j0", reward=0.9)
    transport.state.dead_letter(DeadLetter(run_id="run1", task="flowrl.sample", job_id="run1/e0/j1",
                                           sample_ids=first.jobs["run1/e0/j1"], attempts=3,
                                           error="reward server unreachable", generation=transport.generation))
    again = CeleryTransport(cfg, adapter, transport.policy, ALGORITHMS.get("grpo")(cfg), "run1", run_dir=tmp_path,
                            resume_epoch=0)
    capture(again)
    assert again.generation and again.generation != transport.generation
    pending = again.dispatch(plan_epoch(cfg, rows, 0, 0, 1), 0)
    assert all(SampleJob.model_validate_json(m).generation == again.generation for m in again.sent)
    again.state.push_scored(late)
    for job in pending.jobs:
        again.state.push_scored(scored_for(cfg, adapter, again, pending, job, reward=0.2))
    samples = again.collect(pending)
    assert samples.rows is None and torch.equal(samples.rewards["brightness"], torch.full((len(pending.ids),), 0.2))
    assert again.duplicates == len(first.jobs["run1/e0/j0"])  # the earlier start's samples, not trained


def test_a_sampler_skips_a_job_of_an_earlier_start_of_the_trainer(monkeypatch):
    """Once a resumed trainer has started (its id in Redis, written before it dispatches), a job its dead
    predecessor left in the queue is skipped before anything is loaded for it (it waited for a policy
    version that never came, 600 s a job). A job of the new start that arrives while the old start's
    policy is still the published one (the first process still writing the weights) waits for its own."""
    from services.sampler.runtime import SamplerRuntime, StaleJob, stale_check
    from shared.protocol import BlobRef, PolicyPublished

    def job(generation):
        return SampleJob.model_validate({"run_id": "run1", "job_id": "run1/e3/j0", "epoch": 3, "min_policy_version": 3,
                                         "items": [{"sample_id": "run1/e3/g0/k0", "prompt": "p", "group_id": 0, "seed": 1}],
                                         "params": {"num_inference_steps": 4, "guidance_scale": 1.0, "resolution": [16, 16],
                                                    "dynamics": "ODE", "noise_level": 0.0, "sde_steps": [], "batch_size": 1},
                                         "model": {}, "store_url": "memory://x",
                                         "rewards": [{"reward_model": "brightness"}], "generation": generation})

    def published(version, generation):
        return PolicyPublished(run_id="run1", version=version, finetune_type="lora", published_at=0.0,
                               weights=BlobRef(uri=f"memory://x/v{version}", sha256="0" * 64, nbytes=1),
                               generation=generation)

    class State:
        def __init__(self, policies):
            self.policies = policies

        def generation(self):
            return "new"

        def policy(self):
            return self.policies.pop(0) if len(self.policies) > 1 else self.policies[0]

    runtime = SamplerRuntime(policy_wait_s=5)
    monkeypatch.setattr(runtime, "ensure_model", lambda *a: pytest.fail("loaded a model for a stale job"))
    with pytest.raises(StaleJob, match="dispatched by an earlier start of its trainer"):
        runtime.run(job("old"), State([published(9, "old")]))
    for same in ("new", ""):  # its own start's job, or one from an older flowrl: not skipped
        stale_check(job(same), "new")
    stale_check(job("old"), "")  # no start recorded (an older trainer): as before
    # the new start's job sees the old start's v9 three times, then its own v3 (which it loads)
    loaded = []
    monkeypatch.setattr(runtime, "store", lambda url: type("S", (), {"get_tensors": lambda self, ref: loaded.append(ref.uri) or {}})())
    monkeypatch.setattr("services.sampler.runtime.load_named_parameters", lambda *a: None)
    runtime.adapter = type("A", (), {"transformer": None})()
    got = runtime.ensure_policy(State([published(9, "old")] * 3 + [published(3, "new")]), job("new"))
    assert (got.version, got.generation, loaded) == (3, "new", ["memory://x/v3"])
