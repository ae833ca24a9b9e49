"""Reward scoring overlapped with sampling (``train.overlap_scoring``; by default on a GPU only):
each rolled-out micro-batch is scored in a background thread while the next one samples, with
exactly the scores of scoring the epoch afterwards; groupwise/pairwise rewards (which need whole
groups) are still scored after the rollout; errors name the sample's position in the epoch."""

from __future__ import annotations

import threading

import pytest
import torch

from shared.models import load_adapter
from shared.rewards import RewardModel, RewardOutputError
from shared.rewards.builtin import Brightness
from shared.rewards.overlap import BackgroundScorer, can_overlap
from tests.helpers.tiny import tiny_config
from trainer.algorithms import ALGORITHMS
from trainer.collect import plan_epoch, sample_locally
from trainer.data import load_prompts
from trainer.policy import Policy, attach_trainable

STEPS = 4
# 16 samples in micro-batches of 4: four rollouts, each STEPS transformer calls (no CFG)
GEOMETRY = [f"train.num_inference_steps={STEPS}", "train.group_size=4", "train.unique_sample_num_per_epoch=4",
            "train.per_device_batch_size=4", "train.gradient_step_per_epoch=1"]


class Recording(Brightness):
    """Brightness that records, per ``score`` call, its thread, the grad/autocast modes and the
    prompts; sets ``scored`` after each call."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.calls: list[dict] = []
        self.scored = threading.Event()

    def score(self, images, prompts):
        self.calls.append({"thread": threading.current_thread(), "grad": torch.is_grad_enabled(),
                           "autocast": torch.is_autocast_enabled("cpu"), "n": len(prompts)})
        out = super().score(images, prompts)
        self.scored.set()
        return out


class InfOnThirdCall(Brightness):
    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.count = 0

    def score(self, images, prompts):
        self.count += 1
        out = super().score(images, prompts)
        if self.count == 3:
            out[1] = float("inf")
        return out


class GroupRecording(RewardModel):
    kind = "groupwise"

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.threads: list[threading.Thread] = []

    def score_group(self, images, prompts):
        self.threads.append(threading.current_thread())
        return images.mean(dim=(1, 2, 3))


def setup(tmp_path, *overrides):
    cfg = tiny_config(tmp_path, overrides=GEOMETRY + ["train.overlap_scoring=true"] + list(overrides))
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    rows, _ = load_prompts(cfg.data.dataset_dir, None)
    return cfg, adapter, policy, ALGORITHMS.get("grpo")(cfg), plan_epoch(cfg, rows, 0, 0, 1)


def test_overlapped_scores_equal_scoring_after_the_rollout_and_run_off_the_main_thread(tmp_path):
    cfg, adapter, policy, algorithm, plan = setup(tmp_path)
    recording = Recording()
    _, roll, scores = sample_locally(cfg, adapter, policy, algorithm, {"brightness": recording}, plan)
    off = cfg.model_copy(update={"train": cfg.train.model_copy(update={"overlap_scoring": False})})
    _, roll_after, after = sample_locally(off, adapter, policy, algorithm, {"brightness": Brightness()}, plan)

    assert torch.equal(roll.images, roll_after.images)
    assert scores.keys() == after.keys() and torch.equal(scores["brightness"], after["brightness"])
    assert scores["brightness"].shape == (16,)
    assert [c["n"] for c in recording.calls] == [4, 4, 4, 4]  # one call per micro-batch
    assert all(c["thread"] is not threading.main_thread() for c in recording.calls)


def test_a_micro_batch_is_scored_while_the_next_one_samples(tmp_path):
    """The first transformer call of the second micro-batch waits for the first micro-batch's
    score: scoring after the rollout would never set it (the wait times out)."""
    cfg, adapter, policy, algorithm, plan = setup(tmp_path)
    recording = Recording()
    calls, waited = [0], []

    def hook(module, args, kwargs):
        calls[0] += 1
        if calls[0] == STEPS + 1:
            waited.append(recording.scored.wait(timeout=20))

    handle = adapter.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        sample_locally(cfg, adapter, policy, algorithm, {"brightness": recording}, plan)
    finally:
        handle.remove()
    assert calls[0] == 4 * STEPS and waited == [True]


def test_an_invalid_reward_names_the_sample_by_its_position_in_the_epoch(tmp_path):
    cfg, adapter, policy, algorithm, plan = setup(tmp_path)
    with pytest.raises(RewardOutputError, match=r"sample 9 of the batch \(group 2\)"):
        sample_locally(cfg, adapter, policy, algorithm, {"brightness": InfOnThirdCall()}, plan)


def test_groupwise_rewards_are_scored_after_the_rollout_in_the_callers_thread(tmp_path):
    cfg, adapter, policy, algorithm, plan = setup(
        tmp_path, 'rewards=[{"reward_model": "brightness"}, {"reward_model": "brightness", "name": "group"}]')
    rewards = {"brightness": Brightness(), "group": GroupRecording()}
    assert not can_overlap(rewards)
    _, _, scores = sample_locally(cfg, adapter, policy, algorithm, rewards, plan)
    assert set(scores) == {"brightness", "group"} and scores["group"].shape == (16,)
    assert rewards["group"].threads and all(t is threading.main_thread() for t in rewards["group"].threads)
    with pytest.raises(ValueError, match="pointwise"):
        BackgroundScorer(rewards, cfg.rewards, plan.prompts, torch.zeros(16, dtype=torch.long))


def test_the_scoring_thread_keeps_the_callers_grad_mode_and_scores_without_autocast(tmp_path):
    """Rewards run in their own dtype in training as in evaluation and the reward workers: the rollout's
    mixed-precision autocast ran their matmuls in bf16 whatever their dtype said."""
    from shared.rewards.multi import score_specs

    cfg = tiny_config(tmp_path)
    recording = Recording()
    images = torch.rand(6, 3, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with BackgroundScorer({"brightness": recording}, cfg.rewards, ["p"] * 6, torch.zeros(6, dtype=torch.long)) as s:
            s.submit(slice(0, 3), type("Roll", (), {"images": images[:3]})())
            s.submit(slice(3, 6), type("Roll", (), {"images": images[3:]})())
            out = s.result()
        inline = score_specs({"brightness": recording}, cfg.rewards, images, ["p"] * 6, torch.zeros(6, dtype=torch.long))
    expected = Brightness().score(images, ["p"] * 6)  # float32, no autocast
    assert torch.equal(out["brightness"], expected.float()) and torch.equal(inline["brightness"], expected.float())
    assert [(c["grad"], c["autocast"]) for c in recording.calls] == [(False, False)] * 3


def test_by_default_a_cpu_rollout_scores_after_sampling(tmp_path):
    """On a CPU the scoring thread contends with sampling (bench/overlap_scoring.py measured it
    slower), so the default (None) overlaps only when the policy samples on a GPU."""
    cfg, adapter, policy, algorithm, plan = setup(tmp_path, "train.overlap_scoring=null")
    assert cfg.train.overlap_scoring is None
    recording = Recording()
    sample_locally(cfg, adapter, policy, algorithm, {"brightness": recording}, plan)
    assert [c["n"] for c in recording.calls] == [16]
    assert all(c["thread"] is threading.main_thread() for c in recording.calls)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_default_overlaps_on_a_side_stream_with_the_same_scores(tmp_path):
    cfg = tiny_config(tmp_path, overrides=GEOMETRY)
    adapter = load_adapter(cfg.model, device=torch.device("cuda"), seed=0)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    rows, _ = load_prompts(cfg.data.dataset_dir, None)
    algorithm, plan = ALGORITHMS.get("grpo")(cfg), plan_epoch(cfg, rows, 0, 0, 1)
    recording = Recording()
    _, roll, scores = sample_locally(cfg, adapter, policy, algorithm, {"brightness": recording}, plan)
    assert [c["n"] for c in recording.calls] == [4, 4, 4, 4]  # overlapped: one call per micro-batch
    expected = Brightness().score(roll.images, plan.prompts).float().cpu()
    assert torch.allclose(scores["brightness"], expected, atol=1e-6)


def test_the_default_works_for_nft_whose_sampling_module_holds_no_parameters(tmp_path):
    """NFT samples with the EMA weights through a view that owns no parameters; the default's
    device check must not need any (it raised StopIteration once)."""
    cfg = tiny_config(tmp_path, "nft", overrides=GEOMETRY)
    assert cfg.train.overlap_scoring is None
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    rows, _ = load_prompts(cfg.data.dataset_dir, None)
    recording = Recording()
    _, _, scores = sample_locally(cfg, adapter, policy, ALGORITHMS.get("nft")(cfg), {"brightness": recording},
                                  plan_epoch(cfg, rows, 0, 0, 1))
    assert scores["brightness"].shape == (16,) and [c["n"] for c in recording.calls] == [16]
