"""Video in the distributed mode, outside Celery: a sampler process rolls out a ``wan2_t2v`` job
(``SamplingParams.num_frames``) with published LoRA weights, stores the frames as one 8-bit blob
``[B, F, 3, H, W]``, and a reward worker scores the videos (an image reward per frame, averaged)."""

from __future__ import annotations

import uuid

import pytest
import torch

from services.reward.worker import score_job
from services.sampler.runtime import SamplerRuntime
from shared.config import ModelConfig, parse_config
from shared.models import load_adapter
from shared.protocol import PolicyPublished, RewardJob, SampleItem, SampleJob, SamplingParams
from shared.queue import RunState
from shared.rewards.builtin import luma
from shared.sampling import rollout_batches, unpack_trajectory
from shared.store import BlobStore
from tests.helpers.tiny_pipelines import NEGATIVE, TINY_PIPELINES
from trainer.policy import attach_trainable

SPEC = TINY_PIPELINES["wan2_t2v"]
FRAMES = 9  # not the folder's default (5): the job's num_frames is what counts


@pytest.fixture
def state(redis_url):
    s = RunState.connect(redis_url, "videorun", f"test-{uuid.uuid4().hex[:8]}")
    yield s
    s.clear()


def test_sampler_rolls_out_videos_and_the_reward_worker_scores_them(state, tmp_path):
    folder = SPEC.save(tmp_path / "pipe")
    model = ModelConfig(model_type="wan2_t2v", model_name_or_path=str(folder), options=SPEC.options, lora_rank=4)
    cfg = parse_config({"model": model.model_dump(mode="json"), "rewards": [{"reward_model": "brightness"}]})
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    trainable = attach_trainable(adapter, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.3 * torch.randn_like(p))
    store = BlobStore(f"memory://video-{uuid.uuid4().hex}")
    ref = store.put_tensors("videorun/policy/v1.safetensors", {k: v.detach() for k, v in trainable.items()})
    state.publish(PolicyPublished(run_id="videorun", version=1, weights=ref, finetune_type="lora", published_at=0.0))

    prompts = ["a red circle", "a red circle", "two squares"]
    params = SamplingParams(resolution=SPEC.resolution, num_inference_steps=3, guidance_scale=3.0,
                            dynamics="Flow-SDE", noise_level=0.7, sde_steps=[0, 1], batch_size=2,
                            num_frames=FRAMES)
    items = [SampleItem(sample_id=f"videorun/e0/g{i // 2}/k{i % 2}", prompt=p, negative_prompt=NEGATIVE,
                        group_id=i // 2, seed=7 + i) for i, p in enumerate(prompts)]
    job = SampleJob(run_id="videorun", job_id="videorun/e0/j0", epoch=0, min_policy_version=1, items=items,
                    params=params, model=cfg.model.model_dump(mode="json"), store_url=store.url,
                    rewards=[{"reward_model": "brightness"}])
    traj = SamplerRuntime(device=torch.device("cpu")).run(job, state)

    _, expect = rollout_batches(
        adapter, prompts, [NEGATIVE] * 3, [7, 8, 9], batch_size=2, resolution=SPEC.resolution, num_steps=3,
        guidance_scale=3.0, dynamics="Flow-SDE", noise_level=0.7, sde_steps=[0, 1], keep_means=False,
        log_prob_reduction="mean", transformer=adapter.transformer, num_frames=FRAMES)
    assert expect.images.shape == (3, FRAMES, 3, *SPEC.resolution)
    got = unpack_trajectory(store.get_tensors(traj.tensors))
    torch.testing.assert_close(got.log_probs, expect.log_probs, rtol=0, atol=1e-6)
    frames = store.get_images(traj.images)
    assert torch.equal(frames, (expect.images * 255).round() / 255)

    scored = score_job(RewardJob(trajectory=traj, rewards=job.rewards))
    expected = torch.stack([luma(v).mean() for v in frames])
    torch.testing.assert_close(torch.tensor(scored.rewards["brightness"]), expected)
