"""Condition images in the distributed mode, outside Celery's workers: the Celery transport uploads
each dataset image once per run (the file's bytes, unchanged) and puts its blob reference on the
sample items; a sampler process reads them from the blob store and rolls out a ``flux1-kontext``
job exactly as the trainer would locally; the trainer's conditioning for the collected samples
(re-encoded from its own dataset files) equals the rollout's."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from services.sampler.runtime import SamplerRuntime
from shared.protocol import SampleJob
from shared.queue import RunState, delete_namespace_queues
from shared.sampling import encode_batches, rollout_batches, unpack_trajectory
from tests.helpers.tiny_pipelines import TINY_PIPELINES, tiny_train_config
from trainer.algorithms import ALGORITHMS
from trainer.collect import plan_epoch
from trainer.data import load_dataset
from trainer.policy import Policy, attach_trainable
from trainer.transport import CeleryTransport

SPEC = TINY_PIPELINES["flux1-kontext"]


@pytest.fixture
def setup(tmp_path, redis_url):
    from shared.models import load_adapter

    ns = f"edit-{uuid.uuid4().hex[:8]}"
    folder = SPEC.save(tmp_path / "pipe")
    cfg = tiny_train_config(SPEC, folder, tmp_path, train={"per_device_batch_size": 2})
    cfg = cfg.model_copy(update={"transport": "celery", "queue": cfg.queue.model_copy(update={
        "broker_url": redis_url, "namespace": ns, "key_prefix": ns, "store_url": f"memory://{ns}"})})
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    transport = CeleryTransport(cfg, adapter, policy, ALGORITHMS.get("grpo")(cfg), "editrun", run_dir=tmp_path)
    transport.sent = []
    transport.app.send_task = lambda name, args, queue: transport.sent.append(args[0])
    yield cfg, adapter, transport
    transport.state.clear()
    delete_namespace_queues(transport.state.redis, ns)
    transport.close()


def test_condition_images_travel_as_blobs_and_roll_out_as_locally(setup):
    cfg, adapter, transport = setup
    rows, _ = load_dataset(cfg.data)
    plan = plan_epoch(cfg, rows, 0, 0, 1)
    pending = transport.dispatch(plan, 0)
    jobs = [SampleJob.model_validate_json(m) for m in transport.sent]
    items = [i for job in jobs for i in job.items]
    assert [len(i.images) for i in items] == [1] * len(plan.prompts)
    for item, paths in zip(items, plan.images):  # the dataset file itself, byte for byte
        assert transport.store.get_bytes(item.images[0]) == Path(paths[0]).read_bytes()
    uploaded = dict(transport.condition_refs)
    transport.dispatch(plan_epoch(cfg, rows, 1, 0, 1), 0)
    assert all(transport.condition_refs[p] is ref for p, ref in uploaded.items())  # not uploaded again

    # a sampler rolls out the first job with the policy the trainer published
    transport.publish(1)
    job = jobs[0].model_copy(update={"min_policy_version": 1})
    state = RunState.connect(cfg.queue.broker_url, "editrun", cfg.queue.key_prefix)
    traj = SamplerRuntime(device=torch.device("cpu")).run(job, state)
    got = unpack_trajectory(transport.store.get_tensors(traj.tensors))

    n = len(job.items)
    t = cfg.train
    cond, expect = rollout_batches(
        adapter, plan.prompts[:n], plan.negatives[:n], plan.seeds[:n], batch_size=t.per_device_batch_size,
        resolution=t.resolution, num_steps=t.num_inference_steps, guidance_scale=t.guidance_scale,
        dynamics=t.dynamics_type, noise_level=t.noise_level, sde_steps=plan.sde_steps, keep_means=False,
        log_prob_reduction=t.log_prob_reduction, transformer=adapter.transformer, images=plan.images[:n])
    torch.testing.assert_close(got.log_probs, expect.log_probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.final_latents, expect.final_latents, rtol=0, atol=1e-6)

    # what the trainer trains the collected samples with: its own encoding of the same files
    again = encode_batches(adapter, plan.prompts[:n], plan.negatives[:n], t.guidance_scale,
                           t.per_device_batch_size, images=plan.images[:n], resolution=t.resolution)
    for key, value in cond.tensors.items():
        assert torch.equal(again.tensors[key], value), key
    assert pending.plan is plan

    # the trajectory names each sample's condition images, so a reward worker scores an edit
    # against its source exactly as the embedded trainer does with the dataset files
    from services.reward.worker import score_job
    from shared.condition_images import open_rows
    from shared.protocol import RewardJob
    from shared.rewards import build_reward, score_all

    assert traj.condition_images == [i.images for i in job.items]
    spec = {"name": "keep", "reward_model": "source_similarity"}
    scored = score_job(RewardJob(trajectory=traj, rewards=[spec]))
    images = transport.store.get_images(traj.images)
    local = score_all(build_reward("source_similarity"), images, plan.prompts[:n], torch.arange(n), 8,
                      open_rows(plan.images[:n]))
    assert torch.allclose(torch.tensor(scored.rewards["keep"]), local, atol=1e-6)
    assert len(set(scored.rewards["keep"])) > 1  # the score depends on the image
