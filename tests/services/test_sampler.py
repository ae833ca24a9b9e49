"""The sampler outside Celery: a job sampled by a sampler process with published weights equals
the trainer's own rollout with those weights; policy waiting; the task failure policy."""

from __future__ import annotations

import uuid

import pytest
import torch

from shared.config import parse_config
from shared.models import load_adapter
from shared.protocol import DeadLetter, PolicyPublished, SampleItem, SampleJob, SamplingParams
from shared.queue import QueueSettings, RunState, make_celery
from shared.sampling import rollout_batches, unpack_trajectory
from shared.store import BlobStore
from shared.tasks import guarded_task
from services.sampler.runtime import PolicyTimeout, SamplerRuntime
from trainer.policy import attach_trainable

CFG = parse_config({"model": {"model_type": "tiny", "lora_rank": 4},
                    "train": {"resolution": 16, "num_inference_steps": 6},
                    "rewards": [{"reward_model": "brightness"}]})
PARAMS = SamplingParams(resolution=(16, 16), num_inference_steps=6, guidance_scale=1.0,
                        dynamics="Flow-SDE", noise_level=0.7, sde_steps=[1, 3], keep_means=True,
                        batch_size=3)


@pytest.fixture
def state(redis_url):
    s = RunState.connect(redis_url, "samplerun", f"test-{uuid.uuid4().hex[:8]}")
    s.url = redis_url
    yield s
    s.clear()


def make_job(store_url: str, version: int = 1, params: SamplingParams = PARAMS) -> SampleJob:
    items = [SampleItem(sample_id=f"samplerun/e0/g{i // 2}/k{i % 2}", prompt=p, group_id=i // 2, seed=100 + i)
             for i, p in enumerate(["a red circle", "a red circle", "two squares", "two squares"])]
    return SampleJob(run_id="samplerun", job_id="samplerun/e0/j0", epoch=0, min_policy_version=version,
                     items=items, params=params, model=CFG.model.model_dump(mode="json"), model_seed=0,
                     store_url=store_url, rewards=[{"reward_model": "brightness"}])


@pytest.mark.parametrize("tail", [None, ("dpm_solver++", 0.5)], ids=["plain", "ode_tail"])
def test_sampler_with_published_weights_reproduces_the_trainers_rollout(state, tail):
    """(``ode_tail``: the job's params carry train.ode_tail; the sampler runs the same short tail.)"""
    # the trainer side: LoRA attached and moved away from its zero-output init
    adapter = load_adapter(CFG.model, device=torch.device("cpu"), seed=0)
    trainable = attach_trainable(adapter, CFG)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.3 * torch.randn_like(p))
    store = BlobStore(f"memory://sampler-{uuid.uuid4().hex}")
    ref = store.put_tensors("samplerun/policy/v1.safetensors", {k: v.detach() for k, v in trainable.items()})
    state.publish(PolicyPublished(run_id="samplerun", version=1, weights=ref, finetune_type="lora",
                                  published_at=0.0))

    params = PARAMS if tail is None else PARAMS.model_copy(update={"tail_solver": tail[0], "tail_ratio": tail[1]})
    job = make_job(store.url, params=params)
    traj = SamplerRuntime(device=torch.device("cpu")).run(job, state, attempt=2)
    assert traj.policy_version == 1 and traj.sample_ids == [i.sample_id for i in job.items]
    assert traj.tensors.uri.startswith(f"{store.url}/samplerun/e0/j0/a2-")  # attempt 2, its own delivery
    got = unpack_trajectory(store.get_tensors(traj.tensors))

    _, expect = rollout_batches(
        adapter, [i.prompt for i in job.items], [None] * 4, [i.seed for i in job.items], batch_size=3,
        resolution=(16, 16), num_steps=6, guidance_scale=1.0, dynamics="Flow-SDE", noise_level=0.7,
        sde_steps=[1, 3], keep_means=True, log_prob_reduction="mean", transformer=adapter.transformer,
        tail_solver=None if tail is None else tail[0], tail_ratio=1.0 if tail is None else tail[1])
    assert expect.sigmas.shape[0] == (7 if tail is None else 5 + 1)  # 6 steps; with the tail: 4 + ceil(0.5 * 2)
    for key in ("final_latents", "latents", "next_latents", "log_probs", "stds", "means", "sigmas"):
        torch.testing.assert_close(getattr(got, key), getattr(expect, key).float(), rtol=0, atol=1e-6,
                                   msg=key)
    assert traj.sde_steps == got.sde_steps == expect.sde_steps == [1, 3]
    assert torch.equal(store.get_images(traj.images), (expect.images * 255).round() / 255)


def test_sampler_waits_for_the_policy_version_then_says_why(state):
    store = BlobStore(f"memory://sampler-{uuid.uuid4().hex}")
    runtime = SamplerRuntime(device=torch.device("cpu"), policy_wait_s=0.2)
    with pytest.raises(PolicyTimeout, match=r"needs policy version >= 1.*newest published one is None"):
        runtime.run(make_job(store.url), state)


def run_task(state, body, *, max_retries: int = 0, max_deliveries: int = 3, on_dead_letter=None):
    """``body`` registered through :func:`guarded_task`, against the state's Redis."""
    settings = QueueSettings(broker_url=state.url, max_retries=max_retries,
                             max_deliveries=max_deliveries)
    app = make_celery(settings, name=f"test-{uuid.uuid4().hex[:6]}")
    task = guarded_task(app, settings, "flowrl.test", SampleJob, body, job_id=lambda j: j.job_id,
                        sample_ids=lambda j: [i.sample_id for i in j.items],
                        run_id=lambda j: (j.run_id, state.keys.prefix), on_dead_letter=on_dead_letter)
    return task


def test_every_dead_letter_calls_the_hook(state):
    """The workers count dead letters in Prometheus through ``on_dead_letter``: once per letter,
    on each path (failure, redelivery cap, unparsable message), never on success."""
    counted = []
    hook = lambda: counted.append(len(state.dead_letters()))  # noqa: E731 (called after the write)
    raw = make_job("memory://x").model_dump_json()
    run_task(state, lambda *a: None, on_dead_letter=hook).apply(args=[raw])
    assert counted == []

    def broken(task, job, st, attempt):
        raise ValueError("no such model")

    run_task(state, broken, on_dead_letter=hook).apply(args=[raw])
    for _ in range(3):
        state.count_delivery("flowrl.test:samplerun/e0/j0:r0")
    run_task(state, lambda *a: None, max_deliveries=2, on_dead_letter=hook).apply(args=[raw])
    run_task(state, lambda *a: None, on_dead_letter=hook).apply(
        args=['{"run_id": "samplerun", "key_prefix": "%s", "job_id": "j9"}' % state.keys.prefix])
    assert counted == [1, 2, 3]


def test_failures_are_dead_lettered_with_the_error(state):
    def broken(task, job, st, attempt):
        raise ValueError("the model: section names no such model")

    raw = make_job("memory://x").model_dump_json()
    run_task(state, broken).apply(args=[raw])
    (letter,) = state.dead_letters()
    assert isinstance(letter, DeadLetter) and letter.job_id == "samplerun/e0/j0"
    assert letter.sample_ids[0] == "samplerun/e0/g0/k0" and "no such model" in letter.error


def test_a_task_that_keeps_killing_its_worker_is_dead_lettered(state):
    ran = []
    raw = make_job("memory://x").model_dump_json()
    for _ in range(2):  # two earlier starts died with their worker
        state.count_delivery("flowrl.test:samplerun/e0/j0:r0")
    run_task(state, lambda *a: ran.append(1), max_deliveries=2).apply(args=[raw])
    assert not ran
    (letter,) = state.dead_letters()
    assert "started 3 times" in letter.error


def test_transient_errors_are_retried_then_given_up(state):
    calls = []

    def flaky(task, job, st, attempt):
        calls.append(attempt)
        raise ConnectionError("reward server refused the connection")

    raw = make_job("memory://x").model_dump_json()
    run_task(state, flaky, max_retries=0).apply(args=[raw])
    assert calls == [0]
    assert "ConnectionError: reward server refused" in state.dead_letters()[0].error


def test_an_unparsable_message_is_reported_to_its_run(state):
    run_task(state, lambda *a: None).apply(args=['{"run_id": "samplerun", "key_prefix": "%s", "job_id": "j9"}'
                                                 % state.keys.prefix])
    (letter,) = state.dead_letters()
    assert letter.job_id == "j9" and "does not parse" in letter.error


def test_errors_that_say_they_are_retryable_are_retried(state):
    from shared.rewards.remote import RemoteRewardError

    class Retried(Exception):
        pass

    def unreachable(task, job, st, attempt):
        raise RemoteRewardError("reward server at http://x failed after 3 attempt(s)", retryable=True)

    task = run_task(state, unreachable, max_retries=2)
    task.retry = lambda exc, countdown: Retried(countdown)  # what Celery's retry would schedule
    with pytest.raises(Retried) as e:
        task.apply(args=[make_job("memory://x").model_dump_json()], throw=True)
    assert e.value.args == (2.0,) and state.dead_letters() == []


def _fake_roll(b: int, steps: list[int], seed: int, bf16: bool = False):
    from shared.sampling import Rollout

    g = torch.Generator().manual_seed(seed)
    chain = torch.randn(b, 7, 4, 2, 2, generator=g)
    if bf16:
        chain = chain.bfloat16().float()
    return Rollout(final_latents=chain[:, -1], images=torch.rand(b, 3, 5, 4, generator=g),
                   sigmas=torch.linspace(1, 0, 7), sde_steps=steps, latents=chain[:, steps],
                   next_latents=chain[:, [i + 1 for i in steps]], log_probs=torch.randn(b, len(steps), generator=g),
                   stds=torch.rand(b, len(steps), generator=g), means=None)


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_streamed_micro_batches_equal_the_whole_rollout_written_at_once(tmp_path, state_dtype):
    """TrajectoryWriter: micro-batches handed over one by one give the blobs' content of the
    whole rollout (rows in job order), for consecutive windows and bf16 states."""
    from shared.sampling import Rollout, pack_trajectory
    from services.sampler.runtime import TrajectoryWriter, write_trajectory

    store = BlobStore(f"file://{tmp_path}")
    job = make_job(store.url).model_copy(update={"params": PARAMS.model_copy(update={"state_dtype": state_dtype})})
    parts = [_fake_roll(3, [1, 2, 3], 1, state_dtype == "bfloat16"), _fake_roll(1, [1, 2, 3], 2, state_dtype == "bfloat16")]
    writer = TrajectoryWriter(store, job, attempt=0)
    for p in parts:
        writer.add(p)
    traj = writer.finish(3, worker="w", seconds=1.0)
    cat = lambda f: torch.cat([getattr(p, f) for p in parts])  # noqa: E731
    whole = Rollout(final_latents=cat("final_latents"), images=cat("images"), sigmas=parts[0].sigmas,
                    sde_steps=[1, 2, 3], latents=cat("latents"), next_latents=cat("next_latents"),
                    log_probs=cat("log_probs"), stds=cat("stds"), means=None)
    once = write_trajectory(store, job.model_copy(update={"job_id": "samplerun/e0/j1"}), whole, 3)
    a, b = store.get_tensors(traj.tensors), store.get_tensors(once.tensors)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a["states"].dtype == getattr(torch, state_dtype)
    assert all(torch.equal(v, pack_trajectory(whole, state_dtype)[k]) for k, v in a.items())
    assert torch.equal(store.get_images(traj.images), store.get_images(once.images))
    assert traj.policy_version == 3 and traj.sde_steps == [1, 2, 3] and traj.tensors.xxh3_128


def test_a_failed_job_leaves_no_blob_and_writer_errors_reach_the_caller(tmp_path):
    from services.sampler.runtime import TrajectoryWriter

    store = BlobStore(f"file://{tmp_path}")
    job = make_job(store.url)
    writer = TrajectoryWriter(store, job)
    writer.add(_fake_roll(3, [1, 3], 1))
    writer.abort()  # sampling of the next micro-batch failed
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    writer = TrajectoryWriter(store, job)
    writer.add(_fake_roll(3, [1, 3], 1))
    writer.add(_fake_roll(3, [1, 3], 2))  # 6 rows for a job of 4
    with pytest.raises(ValueError, match="parts hold .* need"):
        writer.finish(1)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    with pytest.raises(ValueError, match="at least one micro-batch"):
        TrajectoryWriter(store, job).finish(1)


def test_a_redelivered_job_writes_beside_the_first_delivery_not_over_it(tmp_path):
    """The same job and retry count started twice (a redelivery after the worker died: Celery keeps the
    retry count) writes two blobs: the first, which a queued reward job may reference, stays as it was."""
    from services.sampler.runtime import write_trajectory

    store = BlobStore(f"file://{tmp_path}")
    job = make_job(store.url)
    first = write_trajectory(store, job, _fake_roll(4, [1, 3], 1), 0)
    again = write_trajectory(store, job, _fake_roll(4, [1, 3], 2), 0)  # a GPU re-roll differs
    assert first.tensors.uri != again.tensors.uri and first.images.uri != again.images.uri
    assert f"/{job.job_id}/a0-" in first.tensors.uri
    assert not torch.equal(store.get_tensors(first.tensors)["states"], store.get_tensors(again.tensors)["states"])
