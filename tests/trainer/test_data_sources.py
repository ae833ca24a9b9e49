"""Several prompt sources (``data.datasets``, Flow-Factory's multi-source layout): the config's
rules, loading and tagging, an epoch's groups split by weight (:func:`trainer.collect.apportion`),
rewards routed to their sources (``rewards[].datasets``) in scoring and advantages, per-source
metrics, and the distributed mode's messages carrying each sample's source."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from shared.config import ConfigError
from shared.rewards import REWARDS
from shared.rewards.multi import build_rewards, score_specs
from tests.helpers.tiny import PROMPTS, tiny_raw
from trainer.advantages import compute_advantages
from trainer.collect import apportion, plan_epoch
from trainer.data import DatasetError, load_dataset

TOY = ["a photo of a red circle", "a photo of a blue square", "a photo of a green triangle"]


def two_sources(tmp_path, *, weights=(3, 1), overrides: list[str] | None = None, **extra):
    """A tiny config with sources ``free`` (the tiny prompts, with a test split) and ``toy``
    (toy-world prompts, train split only)."""
    from shared.config import apply_overrides, parse_config

    raw = tiny_raw(tmp_path)
    free = tmp_path / "data"  # tiny_raw's folder: train.txt and test.txt
    toy = tmp_path / "toy"
    toy.mkdir()
    (toy / "train.txt").write_text("\n".join(TOY) + "\n")
    raw["data"] = {"datasets": [{"name": "free", "dataset_dir": str(free), "train": {"weight": weights[0]}},
                                {"name": "toy", "dataset_dir": str(toy), "train": {"weight": weights[1]}}]}
    raw.update(extra)
    return parse_config(apply_overrides(raw, overrides or []))


# ------------------------------------------------------------------ apportion


@pytest.mark.parametrize("total, weights, expected", [
    (48, [3, 1], [36, 12]), (2, [1, 1, 1], [1, 1, 0]), (7, [1, 2, 4], [1, 2, 4]),
    (10, [1, 1, 1], [4, 3, 3]), (5, [1], [5]), (3, [1, 2], [1, 2]), (4, [1, 2], [1, 3])])
def test_apportion_closed_forms(total, weights, expected):
    assert apportion(total, weights) == expected


def test_apportion_sums_and_stays_within_one_of_the_exact_share():
    rng = random.Random(0)
    for _ in range(500):
        weights = [rng.randint(1, 9) for _ in range(rng.randint(1, 5))]
        total = rng.randint(0, 200)
        counts = apportion(total, weights)
        assert sum(counts) == total
        for c, w in zip(counts, weights):
            assert abs(c - total * w / sum(weights)) < 1


# ------------------------------------------------------------------ config


def test_config_takes_one_folder_or_a_list(tmp_path):
    with pytest.raises(ConfigError, match=r"data.dataset_dir and data.datasets are both set.*Fix"):
        two_sources(tmp_path, overrides=["data.dataset_dir=elsewhere"])


@pytest.mark.parametrize("change, message", [
    (lambda d: d[1].update(name="free"), r"names \['free', 'free'\] repeat"),
    (lambda d: [s.update(train=None) for s in d], "nothing to train on"),
])
def test_config_rejects_bad_source_lists(tmp_path, change, message):
    from shared.config import parse_config

    cfg = two_sources(tmp_path)
    raw = cfg.model_dump(mode="json", exclude_unset=True)
    change(raw["data"]["datasets"])
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_reward_sources_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"rewards\['brightness'\].datasets: \['tyo'\] are not among "
                                          r"data.datasets' names \['free', 'toy'\]"):
        two_sources(tmp_path, rewards=[{"reward_model": "brightness", "datasets": ["tyo"]}])
    from shared.config import parse_config

    raw = tiny_raw(tmp_path / "one")
    raw["rewards"] = [{"reward_model": "brightness", "datasets": ["toy"]}]
    with pytest.raises(ConfigError, match="but data has no datasets list"):
        parse_config(raw)


def test_a_routed_reward_passes_no_datasets_option_to_the_model(tmp_path):
    cfg = two_sources(tmp_path, rewards=[{"reward_model": "brightness", "datasets": ["toy"]},
                                         {"reward_model": "jpeg_compressibility", "datasets": ["free"]}])
    assert cfg.rewards[0].datasets == ["toy"] and cfg.rewards[0].options == {}
    build_rewards(cfg.rewards, "cpu")  # brightness takes no `datasets` argument


def test_every_source_needs_a_reward_on_its_side(tmp_path):
    # free trains with no reward scoring it: its advantages would all be 0
    with pytest.raises(ConfigError, match=r"\['free'\] are trained on, but no reward in rewards scores them.*Fix"):
        two_sources(tmp_path / "a", rewards=[{"reward_model": "brightness", "datasets": ["toy"]}])
    # an evaluated source without an eval reward is allowed (Flow-Factory allows it): it gets no score
    two_sources(tmp_path / "b", eval_rewards=[{"reward_model": "brightness", "datasets": ["toy"]}])
    # an eval reward routed to a source that is not evaluated scores nothing there
    with pytest.raises(ConfigError, match=r"eval_rewards\['brightness'\].datasets: \['toy'\] have eval: null"):
        two_sources(tmp_path / "d", overrides=["data.datasets.1.eval=null"],
                    eval_rewards=[{"reward_model": "brightness", "datasets": ["toy"]}])
    # a reward routed to an evaluation-only source: it scores it there when it also evaluates ...
    routed = [{"reward_model": "jpeg_compressibility"}, {"reward_model": "brightness", "datasets": ["toy"]}]
    two_sources(tmp_path / "c", overrides=["data.datasets.1.train=null"], rewards=routed)
    # ... but not when eval_rewards evaluate instead: then it never scores it
    with pytest.raises(ConfigError, match=r"rewards\['brightness'\].datasets: \['toy'\] have train: null"):
        two_sources(tmp_path / "e", overrides=["data.datasets.1.train=null"], rewards=routed,
                    eval_rewards=[{"reward_model": "brightness"}])


# ------------------------------------------------------------------ loading and planning


def test_sources_load_tagged_and_each_evaluates_its_test_or_train_split(tmp_path):
    cfg = two_sources(tmp_path)
    train, held = load_dataset(cfg.data)
    assert [r.prompt for r in train] == PROMPTS + TOY
    assert [r.dataset for r in train] == ["free"] * len(PROMPTS) + ["toy"] * len(TOY)
    # free has a test split (6 prompts); toy has none, so its train prompts are evaluated
    assert [(r.prompt, r.dataset) for r in held] == [(p, "free") for p in PROMPTS[:6]] + [(p, "toy") for p in TOY]


def test_apportion_with_a_generator_gives_each_source_its_quota_over_epochs():
    """Weights 3:1 and 2 groups an epoch: the largest remainder alone gave the second source nothing,
    ever; drawn with the epoch's generator each source gets its exact quota in expectation."""
    g = torch.Generator().manual_seed(0)
    for weights, total in (([3, 1], 2), ([1, 1, 1], 2), ([5, 4], 1)):
        assert apportion(total, weights)[-1] == 0  # without a generator: never
        counts = [apportion(total, weights, g) for _ in range(3000)]
        assert all(sum(c) == total for c in counts)
        share = [sum(c[i] for c in counts) / (3000 * total) for i in range(len(weights))]
        assert all(abs(s - w / sum(weights)) < 0.02 for s, w in zip(share, weights)), (weights, share)
    assert apportion(4, [2, 2], g) == [2, 2]  # exact quotas draw nothing


def test_only_the_evaluated_rows_of_a_source_are_checked(tmp_path):
    """eval.max_dataset_size cuts a source's held-out rows before their media are checked: a bad row
    that is not evaluated does not stop the run (it did)."""
    from shared.config import parse_config

    raw = two_sources(tmp_path).model_dump(mode="json", exclude_unset=True)
    (tmp_path / "toy" / "test.jsonl").write_text('{"prompt": "kept"}\n{"prompt": "cut", "video": "missing.mp4"}\n')
    raw["data"]["datasets"][1]["eval"] = {"max_dataset_size": 1}
    _, held = load_dataset(parse_config(raw).data)
    assert [r.prompt for r in held if r.dataset == "toy"] == ["kept"]
    raw["data"]["datasets"][1]["eval"] = {"max_dataset_size": 2}
    with pytest.raises(DatasetError, match="test.jsonl:2"):
        load_dataset(parse_config(raw).data)


def test_train_null_and_eval_null_and_size_caps(tmp_path):
    cfg = two_sources(tmp_path)
    raw = cfg.model_dump(mode="json", exclude_unset=True)
    raw["data"]["datasets"][0].update(train={"weight": 1, "max_dataset_size": 2}, eval=None)
    raw["data"]["datasets"][1].update(train=None, eval={"max_dataset_size": 1})
    from shared.config import parse_config

    train, held = load_dataset(parse_config(raw).data)
    assert [r.prompt for r in train] == PROMPTS[:2] and [r.prompt for r in held] == TOY[:1]


def test_sources_read_the_splits_they_name(tmp_path):
    from shared.config import parse_config
    from trainer.data import DatasetError

    cfg = two_sources(tmp_path)
    raw = cfg.model_dump(mode="json", exclude_unset=True)
    held_out = tmp_path / "held"  # an evaluation-only source: no train file at all
    held_out.mkdir()
    (held_out / "validation.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n')
    (tmp_path / "toy" / "extra.txt").write_text("a photo of a tiny red circle\n")
    raw["data"]["datasets"][1].update(train={"split": "extra"}, eval={})
    raw["data"]["datasets"].append({"name": "held", "dataset_dir": str(held_out), "train": None,
                                    "eval": {"split": "validation"}})
    train, held = load_dataset(parse_config(raw).data)
    assert [r.prompt for r in train if r.dataset == "toy"] == ["a photo of a tiny red circle"]
    # toy has no test split: its train split's rows are evaluated, as for one folder
    assert [(r.prompt, r.dataset) for r in held if r.dataset != "free"] == [
        ("a photo of a tiny red circle", "toy"), ("a cat", "held"), ("a dog", "held")]
    raw["data"]["datasets"][1]["eval"] = {"split": "missing"}  # named on purpose: no fallback
    with pytest.raises(DatasetError, match="'toy'.*no missing.txt or missing.jsonl, which eval.split names"):
        load_dataset(parse_config(raw).data)
    raw["data"]["datasets"][1]["eval"] = {}
    # an evaluation-only source does not read (or check) its train rows
    (held_out / "train.jsonl").write_text('{"prompt": "a cat", "image": "gone.png"}\n')
    assert [r.prompt for r in load_dataset(parse_config(raw).data)[1] if r.dataset == "held"] == ["a cat", "a dog"]
    (held_out / "train.jsonl").unlink()
    raw["data"]["datasets"][2]["eval"] = {}  # test by default: missing, and no train rows to fall back on
    with pytest.raises(DatasetError, match="'held'.*neither test.txt\\|jsonl nor train.txt\\|jsonl.*Fix"):
        load_dataset(parse_config(raw).data)
    raw["data"]["datasets"][2].update(train={"split": "nope"}, eval=None)
    with pytest.raises(DatasetError, match="'held'.*no nope.txt or nope.jsonl. Fix"):
        load_dataset(parse_config(raw).data)
    raw["data"]["datasets"][2]["dataset_dir"] = str(tmp_path / "absent")
    with pytest.raises(DatasetError, match="'held': dataset_dir .* is not a folder"):
        load_dataset(parse_config(raw).data)
    raw["data"]["datasets"][2]["train"] = {"split": "../train"}
    with pytest.raises(ConfigError, match="split"):
        parse_config(raw)


def test_an_epoch_splits_its_groups_by_weight_over_all_ranks(tmp_path):
    cfg = two_sources(tmp_path, overrides=["train.unique_sample_num_per_epoch=8", "train.group_size=2",
                                           "train.per_device_batch_size=4"])
    train, _ = load_dataset(cfg.data)
    for epoch in range(3):
        plans = [plan_epoch(cfg, train, epoch, rank, 2) for rank in (0, 1)]
        per_group = {g: d for p in plans for g, d in zip(p.group_ids, p.datasets)}
        assert Counter(per_group.values()) == {"free": 6, "toy": 2}  # 8 groups, weights 3:1
        for p in plans:  # each sample's source is its prompt's
            prompts = {"free": set(PROMPTS), "toy": set(TOY)}
            assert all(prompt in prompts[d] for prompt, d in zip(p.prompts, p.datasets))
        assert plans[0].datasets == plan_epoch(cfg, train, epoch, 0, 2).datasets  # deterministic
    # the toy source's 2 groups of an epoch are 2 different toy prompts (its own permutation)
    p = plan_epoch(cfg, train, 0, 0, 1)
    assert len({prompt for prompt, d in zip(p.prompts, p.datasets) if d == "toy"}) == 2


# ------------------------------------------------------------------ routing


def test_a_routed_reward_scores_only_its_sources_and_abstains_elsewhere(tmp_path):
    cfg = two_sources(tmp_path, rewards=[{"reward_model": "brightness"},
                                         {"reward_model": "toy_geneval", "datasets": ["toy"]}])
    rewards = build_rewards(cfg.rewards, "cpu")
    prompts = [PROMPTS[0], TOY[0], PROMPTS[1], TOY[1]]
    datasets = ["free", "toy", "free", "toy"]
    images = torch.rand(4, 3, 16, 16)
    groups = torch.arange(4)
    with pytest.raises(ValueError, match="only scores toy-world prompts"):  # unrouted, it cannot
        score_specs(rewards, cfg.rewards, images, prompts, groups)
    scores = score_specs(rewards, cfg.rewards, images, prompts, groups, datasets=datasets)
    assert torch.isfinite(scores["brightness"]).all()
    verifier = scores["toy_geneval"]
    assert torch.isnan(verifier[[0, 2]]).all() and torch.isfinite(verifier[[1, 3]]).all()
    alone = REWARDS.get("toy_geneval")().score(images[[1, 3]], [TOY[0], TOY[1]])
    torch.testing.assert_close(verifier[[1, 3]], alone)


@pytest.mark.parametrize("aggregation", ["sum", "gdpo"])
def test_a_reward_that_does_not_apply_adds_nothing_to_the_advantage(aggregation):
    """Groups 0-1 are source A (both rewards apply), groups 2-3 source B (only r1 applies, r2 is
    NaN there): B's advantages are exactly those of r1 alone, A's those of both rewards."""
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    r1 = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.2, 0.8, 0.3, 0.6, 0.1, 0.9, 0.4, 0.7])
    r2 = torch.tensor([1.0, 0.0, 0.5, 0.3, 0.9, 0.1] + [float("nan")] * 6)
    applies = {"r2": torch.tensor([True] * 6 + [False] * 6)}
    kw = dict(aggregation=aggregation, global_std=False)
    adv, _ = compute_advantages({"r1": r1, "r2": r2}, {"r1": 1.0, "r2": 1.0}, g, applies=applies, **kw)
    assert torch.isfinite(adv).all() and (adv[6:] != 0).all()  # without `applies` B's would be 0
    unrouted, _ = compute_advantages({"r1": r1, "r2": r2}, {"r1": 1.0, "r2": 1.0}, g, **kw)
    assert (unrouted[6:] == 0).all()
    if aggregation == "sum":  # per-group normalization: each group on its own
        only_r1, _ = compute_advantages({"r1": r1[6:]}, {"r1": 1.0}, g[6:], **kw)
        both, _ = compute_advantages({"r1": r1[:6], "r2": r2[:6]}, {"r1": 1.0, "r2": 1.0}, g[:6], **kw)
        torch.testing.assert_close(adv, torch.cat([both, only_r1]))


# ------------------------------------------------------------------ end to end


def test_training_on_two_sources_reports_each(tmp_path):
    from trainer.loop import train

    cfg = two_sources(tmp_path, rewards=[{"reward_model": "brightness"},
                                         {"name": "verifier", "reward_model": "toy_geneval", "datasets": ["toy"],
                                          "weight": 0.5}],
                      overrides=["train.unique_sample_num_per_epoch=4", "train.group_size=4",
                                 "train.per_device_batch_size=16", "train.gradient_step_per_epoch=1",
                                 "train.max_epochs=1", "eval.num_inference_steps=4"])
    summary = train(cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "tiny_grpo" / "metrics.jsonl").read_text().splitlines()]
    epoch = next(r for r in rows if "train/samples/free" in r)
    assert epoch["train/samples/free"] == 12 and epoch["train/samples/toy"] == 4  # 4 groups of 4, 3:1
    assert "train/reward/verifier/toy" in epoch and "train/reward/verifier/free" not in epoch
    assert epoch["train/reward/brightness/free"] > 0 and epoch["train/reward/brightness/toy"] > 0
    evals = [r for r in rows if "eval/reward/brightness" in r]
    assert {"eval/reward/brightness/free", "eval/reward/brightness/toy", "eval/reward/verifier/toy"} <= set(evals[-1])
    assert "eval/reward/verifier/free" not in evals[-1]
    assert "eval/verifier/accuracy" in evals[-1]  # the verifier's details, on its own prompts only
    assert summary["samples"] == 16


# ------------------------------------------------------------------ distributed mode messages


def test_jobs_and_trajectories_carry_each_samples_source(tmp_path):
    from shared.protocol import SampleItem, Trajectory

    item = SampleItem(sample_id="r/e0/g0/k0", prompt="p", group_id=0, seed=1, dataset="toy")
    assert SampleItem.model_validate_json(item.model_dump_json()).dataset == "toy"
    from tests.shared.test_protocol import trajectory  # a valid Trajectory of 2 samples

    t = trajectory()
    assert t.datasets == []
    with pytest.raises(ValueError, match="sources for 1 samples"):
        Trajectory.model_validate({**t.model_dump(), "datasets": ["toy"]})
    both = Trajectory.model_validate({**t.model_dump(), "datasets": ["toy", "free"]})
    assert Trajectory.model_validate_json(both.model_dump_json()).datasets == ["toy", "free"]


def test_the_reward_worker_routes_by_the_trajectorys_sources():
    """What a reward worker does with a job of the distributed mode: the verifier scores only the
    samples its trajectory marks as its source's (and would fail on the others)."""
    from services.reward.worker import score_job
    from shared.protocol import RewardJob, Trajectory
    from shared.store import BlobStore

    url = "memory://flowrl-test-sources"
    ref = BlobStore(url).put_images("run/e0/j0/images", torch.rand(4, 3, 16, 16))
    traj = Trajectory(run_id="run", job_id="run/e0/j0", epoch=0, policy_version=0,
                      sample_ids=[f"run/e0/g{i}/k0" for i in range(4)], group_ids=[0, 1, 2, 3],
                      prompts=[PROMPTS[0], TOY[0], PROMPTS[1], TOY[2]], sde_steps=[], store_url=url,
                      tensors=ref, images=ref, datasets=["free", "toy", "free", "toy"])
    rewards = [{"reward_model": "brightness"}, {"reward_model": "toy_geneval", "datasets": ["toy"]}]
    scored = score_job(RewardJob(trajectory=traj, rewards=rewards))
    assert scored.rewards["toy_geneval"][0] is None and scored.rewards["toy_geneval"][2] is None
    assert scored.rewards["toy_geneval"][1] is not None and scored.rewards["toy_geneval"][3] is not None
    assert all(v is not None for v in scored.rewards["brightness"])


def test_a_source_with_its_own_eval_settings_is_sampled_and_scored_with_them(tmp_path):
    from shared.config import ConfigError
    from trainer.evaluate import eval_settings
    from trainer.loop import train

    overrides = ["train.unique_sample_num_per_epoch=4", "train.group_size=4", "train.per_device_batch_size=16",
                 "train.gradient_step_per_epoch=1", "train.max_epochs=1", "eval.num_inference_steps=4"]
    cfg = two_sources(tmp_path, rewards=[{"reward_model": "brightness"},
                                         {"name": "width", "reward_model": "tests.helpers.row_target.ImageWidth"}],
                      overrides=overrides)
    cfg.data.datasets[1].eval.resolution = 32  # the toy source at 32 px, 2 steps; free keeps eval's 16 px
    cfg.data.datasets[1].eval.num_inference_steps = 2
    assert eval_settings(cfg, "toy").resolution == (32, 32) and eval_settings(cfg, "toy").num_inference_steps == 2
    assert eval_settings(cfg, "free") == eval_settings(cfg, "")
    train(cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "tiny_grpo" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "eval/reward/width" in r][-1]
    assert last["eval/reward/width/free"] == pytest.approx(0.16) and last["eval/reward/width/toy"] == pytest.approx(0.32)
    assert any((tmp_path / "runs" / "tiny_grpo" / "images").glob("eval_grid_*.png"))  # the grid mixes both sizes
    (tmp_path / "f").mkdir()
    with pytest.raises(ConfigError, match="eval settings of their own"):
        two_sources(tmp_path / "f", overrides=overrides + ["train.fsdp=true"],
                    data={"datasets": [{"name": "a", "dataset_dir": str(tmp_path / "data"),
                                        "eval": {"guidance_scale": 2.0}}]})
