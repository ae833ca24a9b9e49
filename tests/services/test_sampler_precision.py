"""Samplers roll out in the trainer's mixed precision (``SamplingParams.autocast`` =
``train.mixed_precision``): the log-probs the trainer recomputes under its bf16 autocast then equal
the sampler's (a PPO ratio of 1 before any update), where a float32 rollout starts off by about
Flow-GRPO's whole clip range (1e-4)."""

from __future__ import annotations

import uuid

import torch

from shared.models import load_adapter
from tests.helpers.tiny import tiny_config


def test_a_bf16_trainer_replays_the_samplers_log_probs_exactly(tmp_path, redis_url):
    from services.sampler.runtime import SamplerRuntime
    from shared.protocol import PolicyPublished, SampleItem, SampleJob
    from shared.queue import RunState
    from shared.sampling import unpack_trajectory
    from shared.store import BlobStore
    from trainer.algorithms import ALGORITHMS, TrainBatch
    from trainer.collect import plan_epoch, sampling_params
    from trainer.data import load_dataset
    from trainer.policy import Policy, attach_trainable

    cfg = tiny_config(tmp_path, overrides=["train.mixed_precision=bf16", "train.num_inference_steps=6"])
    assert sampling_params(cfg, plan_epoch(cfg, load_dataset(cfg.data)[0], 0, 0, 1), False).autocast == "bf16"
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    trainable = attach_trainable(adapter, cfg)
    policy = Policy(adapter, adapter.transformer, cfg, trainable)
    state = RunState.connect(redis_url, "precrun", f"test-{uuid.uuid4().hex[:8]}")
    ratio_off = {}
    try:
        store = BlobStore(f"memory://prec-{uuid.uuid4().hex}")
        ref = store.put_tensors("precrun/policy/v0.safetensors", {k: v.detach() for k, v in trainable.items()})
        state.publish(PolicyPublished(run_id="precrun", version=0, weights=ref, finetune_type="lora", published_at=0.0))
        prompts = ["a red circle", "a blue square", "a green circle", "a red square"]
        items = [SampleItem(sample_id=f"precrun/e0/g{k}/k0", prompt=p, group_id=k, seed=7 + k)
                 for k, p in enumerate(prompts)]
        sampler = SamplerRuntime(device=torch.device("cpu"))
        for autocast in ("bf16", "no"):
            params = sampling_params(cfg, plan_epoch(cfg, load_dataset(cfg.data)[0], 0, 0, 1), False)
            params = params.model_copy(update={"autocast": autocast, "sde_steps": [0, 1, 2, 3, 4], "batch_size": 4})
            job = SampleJob(run_id="precrun", job_id=f"precrun/e0/{autocast}", epoch=0, min_policy_version=0,
                            items=items, params=params, model=cfg.model.model_dump(mode="json"),
                            model_seed=cfg.train.seed, store_url=store.url, rewards=[{"reward_model": "brightness"}])
            roll = unpack_trajectory(store.get_tensors(sampler.run(job, state).tensors))
            cond = adapter.encode_prompts(prompts, cfg=False)
            batch = TrainBatch(cond=cond, advantages=torch.zeros(4), final_latents=roll.final_latents,
                               sigmas=roll.sigmas, sde_steps=roll.sde_steps, latents=roll.latents,
                               next_latents=roll.next_latents, log_probs=roll.log_probs, stds=roll.stds,
                               means=roll.means, seed=0)
            algo = ALGORITHMS.get("grpo")(cfg)
            worst = 0.0
            for unit in range(len(roll.sde_steps)):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's accelerator.autocast
                    out, *_ = algo.replay(batch, unit, policy)
                worst = max(worst, float((out.log_prob - roll.log_probs[:, unit]).exp().sub(1).abs().max()))
            ratio_off[autocast] = worst
    finally:
        state.clear()
    assert ratio_off["bf16"] < 1e-6, ratio_off
    assert ratio_off["no"] > 1e-5, ratio_off  # what a float32 sampler gave a bf16 trainer
