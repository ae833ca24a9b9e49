"""``train.shared_initial_noise`` (MixGRPO's and TempFlow-GRPO's seed groups): every member of a
group starts from its group's noise and differs only by the SDE steps' noise, in the embedded
rollout and in the sampler service alike."""

from __future__ import annotations

import uuid

import pytest
import torch

from shared.config import ConfigError
from shared.models import load_adapter
from shared.sampling import rollout_batches
from tests.helpers.tiny import tiny_config
from trainer.collect import plan_epoch
from trainer.data import load_dataset

SHARED = ["train.shared_initial_noise=true", "train.train_steps=[1, 2]", "train.num_inference_steps=4",
          "train.group_size=2", "train.unique_sample_num_per_epoch=2", "train.per_device_batch_size=4",
          "train.gradient_step_per_epoch=1", "train.max_epochs=1"]


def roll(adapter, seeds, init_seeds=None):
    return rollout_batches(adapter, ["a red circle"] * len(seeds), [None] * len(seeds), seeds, batch_size=4,
                           resolution=(16, 16), num_steps=4, guidance_scale=1.0, dynamics="Flow-SDE",
                           noise_level=0.7, sde_steps=[1, 2], keep_means=False, log_prob_reduction="mean",
                           transformer=adapter.transformer, init_seeds=init_seeds)[1]


def test_members_share_the_start_and_differ_by_the_sde_noise(tmp_path):
    cfg = tiny_config(tmp_path, overrides=SHARED)
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    own = roll(adapter, [5, 6])
    shared = roll(adapter, [5, 6], init_seeds=[5, 5])
    # step 0 is an ODE step from the shared noise: both enter SDE step 1 in the same state ...
    torch.testing.assert_close(shared.latents[0, 0], shared.latents[1, 0], rtol=0, atol=0)
    assert not torch.equal(own.latents[0, 0], own.latents[1, 0])
    # ... and leave it apart, by the same SDE noise each would draw without init_seeds
    assert not torch.equal(shared.final_latents[0], shared.final_latents[1])
    # member 0: its own seed (to float rounding: the shared prefix runs once, in a batch of its own)
    torch.testing.assert_close(shared.latents[0], own.latents[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(roll(adapter, [5, 6], init_seeds=[5, 6]).final_latents, own.final_latents,
                               rtol=0, atol=0)


def test_the_plan_gives_each_group_its_first_members_seed(tmp_path):
    cfg = tiny_config(tmp_path, overrides=SHARED + ["train.unique_sample_num_per_epoch=4"])
    rows, _ = load_dataset(cfg.data)
    plan = plan_epoch(cfg, rows, 3, 0, 1)
    first = {}
    for g, s in zip(plan.group_ids, plan.seeds):
        first.setdefault(g, s)
    assert plan.init_seeds == [first[g] for g in plan.group_ids] and len(set(plan.init_seeds)) == 4
    assert plan.subset([2, 3]).init_seeds == plan.init_seeds[2:4]
    off = tiny_config(tmp_path, overrides=[o for o in SHARED if "shared_initial_noise" not in o])
    assert plan_epoch(off, rows, 3, 0, 1).init_seeds == []


def test_one_epoch_trains(tmp_path):
    from trainer.loop import train

    summary = train(tiny_config(tmp_path, overrides=SHARED), quiet=True)
    assert summary["optimizer_steps"] == 1 and summary["samples"] == 4


def test_ode_rollouts_refuse_shared_noise(tmp_path):
    with pytest.raises(ConfigError, match="members would be identical images"):
        tiny_config(tmp_path, overrides=["train.shared_initial_noise=true", "train.trainer_type=nft"])


def test_the_sampler_service_rolls_out_the_same(tmp_path, redis_url):
    """A sampler worker given a job whose items carry their group's ``init_seed`` rolls out what the
    embedded trainer does: the same log-probs and images."""
    from services.sampler.runtime import SamplerRuntime
    from shared.protocol import PolicyPublished, SampleItem, SampleJob, SamplingParams
    from shared.queue import RunState
    from shared.sampling import unpack_trajectory
    from shared.store import BlobStore
    from trainer.policy import attach_trainable

    cfg = tiny_config(tmp_path, overrides=SHARED)
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    trainable = attach_trainable(adapter, cfg)
    state = RunState.connect(redis_url, "noiserun", f"test-{uuid.uuid4().hex[:8]}")
    try:
        store = BlobStore(f"memory://noise-{uuid.uuid4().hex}")
        ref = store.put_tensors("noiserun/policy/v0.safetensors", {k: v.detach() for k, v in trainable.items()})
        state.publish(PolicyPublished(run_id="noiserun", version=0, weights=ref, finetune_type="lora",
                                      published_at=0.0))
        params = SamplingParams(resolution=(16, 16), num_inference_steps=4, guidance_scale=1.0, dynamics="Flow-SDE",
                                noise_level=0.7, sde_steps=[1, 2], batch_size=4)
        items = [SampleItem(sample_id=f"noiserun/e0/g0/k{k}", prompt="a red circle", group_id=0, seed=5 + k,
                            init_seed=5) for k in range(2)]
        job = SampleJob(run_id="noiserun", job_id="noiserun/e0/j0", epoch=0, min_policy_version=0, items=items,
                        params=params, model=cfg.model.model_dump(mode="json"), model_seed=cfg.train.seed,
                        store_url=store.url, rewards=[{"reward_model": "brightness"}])
        traj = SamplerRuntime(device=torch.device("cpu")).run(job, state)
        got = unpack_trajectory(store.get_tensors(traj.tensors))
    finally:
        state.clear()
    expect = roll(adapter, [5, 6], init_seeds=[5, 5])
    torch.testing.assert_close(got.latents, expect.latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.log_probs, expect.log_probs, rtol=0, atol=1e-6)


def test_a_groups_ode_prefix_runs_once(tmp_path):
    """TempFlow-GRPO's branching: a group shares its ODE prefix up to the first SDE step, computed
    once for the group (fewer rows through the transformer), the result as when every member
    computes it (per-sample determinism), and members still branch apart at the SDE step."""
    from shared.sampling import shared_prefix_rows

    cfg = tiny_config(tmp_path, overrides=SHARED)
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    rows = []
    handle = adapter.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    prompts, seeds, groups = ["a red circle"] * 2 + ["a blue square"] * 2, [5, 6, 7, 8], [5, 5, 7, 7]
    kw = dict(resolution=(16, 16), num_steps=4, guidance_scale=1.0, dynamics="Flow-SDE", noise_level=0.7,
              sde_steps=[2], keep_means=False, log_prob_reduction="mean", transformer=adapter.transformer)
    together = rollout_batches(adapter, prompts, [None] * 4, seeds,
                               batch_size=4, init_seeds=groups, **kw)[1]
    handle.remove()
    assert rows == [2, 2, 4, 4]  # steps 0 and 1 for the 2 groups, then all 4 members
    for i in range(4):  # each member alone, computing its own prefix
        alone = rollout_batches(adapter, prompts[i:i + 1], [None], [seeds[i]],
                                batch_size=1, init_seeds=[groups[i]], **kw)[1]
        torch.testing.assert_close(together.final_latents[i], alone.final_latents[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(together.log_probs[i], alone.log_probs[0], rtol=0, atol=1e-5)
    assert torch.equal(together.latents[0, 0], together.latents[1, 0])  # one state at the branch step
    assert not torch.equal(together.final_latents[0], together.final_latents[1])  # then apart

    cond = adapter.encode_prompts(["a red circle", "a blue square"], cfg=False)
    assert shared_prefix_rows([5, 5], cond) is None  # one seed, two prompts: nothing shared
    assert shared_prefix_rows([5, 6], cond) is None
