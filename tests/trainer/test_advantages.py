"""GRPO advantages: closed-form examples, GDPO by hand, NaN abstention, id-based grouping."""

import math

import pytest
import torch

from trainer.advantages import AGGREGATIONS, compute_advantages, group_normalize

EPS = 1e-4
IDS6 = torch.tensor([0, 0, 0, 1, 1, 1])


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def test_group_std_closed_form():
    adv = group_normalize(t([1, 2, 3, 10, 10, 10]), IDS6, global_std=False)
    s = math.sqrt(2 / 3)  # population std of (1, 2, 3)
    expected = t([-1 / (s + EPS), 0, 1 / (s + EPS), 0, 0, 0])
    assert adv.dtype == torch.float32
    assert torch.allclose(adv, expected, atol=1e-6)


def test_global_std_closed_form():
    adv = group_normalize(t([1, 2, 3, 10, 10, 10]), IDS6, global_std=True)
    s = math.sqrt(98 / 6)  # population std of all six rewards (mean 6)
    expected = t([-1 / (s + EPS), 0, 1 / (s + EPS), 0, 0, 0])
    assert torch.allclose(adv, expected, atol=1e-6)


def test_equal_rewards_give_zero():
    for global_std in (True, False):
        adv = group_normalize(t([4, 4, 4, 4]), torch.tensor([0, 0, 1, 1]), global_std=global_std)
        assert torch.equal(adv, torch.zeros(4))


def test_duplicate_prompts_in_different_groups_stay_separate():
    prompts = ["a cat", "a cat", "a cat", "a cat"]  # same text, two groups: ids decide
    ids = torch.tensor([7, 7, 3, 3])
    assert len(set(prompts)) == 1
    adv = group_normalize(t([1, 3, 5, 7]), ids, global_std=False)
    assert torch.allclose(adv, t([-1, 1, -1, 1]) / (1 + EPS), atol=1e-6)


def test_non_contiguous_groups():
    ids = torch.tensor([0, 1, 0, 1])
    adv = group_normalize(t([1, 5, 3, 7]), ids, global_std=False)
    assert torch.allclose(adv, t([-1, -1, 1, 1]) / (1 + EPS), atol=1e-6)


def test_nan_abstains():
    ids = torch.tensor([0, 0, 0, 1])
    adv = group_normalize(t([1, float("nan"), 3, 5]), ids, global_std=False)
    assert torch.allclose(adv, t([-1 / (1 + EPS), 0, 1 / (1 + EPS), 0]), atol=1e-6)
    adv = group_normalize(t([1, float("nan"), 3, 5]), ids, global_std=True)
    s = math.sqrt(8 / 3)  # std of the valid (1, 3, 5)
    assert torch.allclose(adv, t([-1 / (s + EPS), 0, 1 / (s + EPS), 0]), atol=1e-6)
    assert torch.equal(group_normalize(t([float("nan")] * 3), torch.tensor([0, 0, 1]), global_std=True), torch.zeros(3))


def test_sum_aggregation_closed_form():
    rewards = {"a": t([1, 2, 3, 0, 0, 0]), "b": t([0, 0, 0, 2, 4, 6])}
    weights = {"a": 2.0, "b": 0.5}
    adv, _ = compute_advantages(rewards, weights, IDS6, aggregation="sum", global_std=False)
    # R = (2, 4, 6, 1, 2, 3): group stds 2*sqrt(2/3) and sqrt(2/3)
    s0, s1 = 2 * math.sqrt(2 / 3), math.sqrt(2 / 3)
    expected = t([-2 / (s0 + EPS), 0, 2 / (s0 + EPS), -1 / (s1 + EPS), 0, 1 / (s1 + EPS)])
    assert torch.allclose(adv, expected, atol=1e-6)
    same = group_normalize(t([2, 4, 6, 1, 2, 3]), IDS6, global_std=True)
    adv_g, _ = compute_advantages(rewards, weights, IDS6, aggregation="sum", global_std=True)
    assert torch.allclose(adv_g, same, atol=1e-6)


def _gdpo_by_hand(rewards, weights, ids, eps=EPS):
    """Straight-line float64 reimplementation with Python loops (NaN = abstain)."""
    n = len(ids)
    total = [0.0] * n
    for name, r in rewards.items():
        r = [float(x) for x in r]
        for i in range(n):
            members = [r[j] for j in range(n) if ids[j] == ids[i] and not math.isnan(r[j])]
            if math.isnan(r[i]):
                total[i] = math.nan
                continue
            mean = sum(members) / len(members)
            std = math.sqrt(sum((m - mean) ** 2 for m in members) / len(members))
            total[i] += weights[name] * (r[i] - mean) / (std + eps)
    valid = [x for x in total if not math.isnan(x)]
    mean = sum(valid) / len(valid)
    std = math.sqrt(sum((x - mean) ** 2 for x in valid) / len(valid))
    return torch.tensor([0.0 if math.isnan(x) else (x - mean) / (std + eps) for x in total], dtype=torch.float32)


def test_gdpo_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    rewards = {"pick": torch.rand(12, generator=g), "ocr": torch.rand(12, generator=g) * 10}
    weights = {"pick": 1.0, "ocr": 0.3}
    adv, _ = compute_advantages(rewards, weights, ids, aggregation="gdpo")
    assert torch.allclose(adv, _gdpo_by_hand(rewards, weights, ids.tolist()), atol=1e-5)
    # global_std does not matter for gdpo
    adv2, _ = compute_advantages(rewards, weights, ids, aggregation="gdpo", global_std=False)
    assert torch.equal(adv, adv2)


def test_gdpo_small_closed_form():
    # one reward, two groups: z = (-1, 1)/(1+eps) in group 0 and (0, 0) in group 1,
    # then batch-normalised: mean 0, std = z/sqrt(2)
    rewards = {"r": t([1, 3, 5, 5])}
    adv, _ = compute_advantages(rewards, {"r": 1.0}, torch.tensor([0, 0, 1, 1]), aggregation="gdpo")
    z = 1 / (1 + EPS)
    s = z / math.sqrt(2)
    assert torch.allclose(adv, t([-z / (s + EPS), z / (s + EPS), 0, 0]), atol=1e-5)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("global_std", [True, False])
def test_permutation_equivariance(aggregation, global_std):
    g = torch.Generator().manual_seed(1)
    ids = torch.arange(5).repeat_interleave(4)
    rewards = {"a": torch.randn(20, generator=g), "b": torch.randn(20, generator=g)}
    rewards["a"][3] = float("nan")
    weights = {"a": 1.0, "b": 2.0}
    adv, metrics = compute_advantages(rewards, weights, ids, aggregation=aggregation, global_std=global_std)
    perm = torch.randperm(20, generator=g)
    adv_p, metrics_p = compute_advantages(
        {k: v[perm] for k, v in rewards.items()}, weights, ids[perm], aggregation=aggregation, global_std=global_std
    )
    assert torch.allclose(adv_p, adv[perm], atol=1e-6)
    assert metrics_p == pytest.approx(metrics)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_multi_reward_nan_handling(aggregation):
    nan = float("nan")
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    rewards = {"a": t([1, 2, 3, 4, 5, 6]), "b": t([0, nan, 1, 2, 2, 0])}
    weights = {"a": 1.0, "b": 1.0}
    adv, metrics = compute_advantages(rewards, weights, ids, aggregation=aggregation)
    assert adv[1] == 0.0  # aggregated value NaN -> no signal
    assert bool(torch.isfinite(adv).all())
    if aggregation == "sum":
        # R[1] is NaN and left out of every statistic: dropping the sample changes nothing else
        keep = torch.tensor([0, 2, 3, 4, 5])
        adv_kept, _ = compute_advantages({k: v[keep] for k, v in rewards.items()}, weights, ids[keep])
        assert torch.allclose(adv[keep], adv_kept, atol=1e-6)
    else:
        # only b's NaN entry leaves b's group statistics; a's value of sample 1 still counts for a
        assert torch.allclose(adv, _gdpo_by_hand(rewards, weights, ids.tolist()), atol=1e-5)
    assert metrics["reward_nan_count"] == 1.0
    assert metrics["reward_b_nan_count"] == 1.0
    assert metrics["reward_b_mean"] == pytest.approx(1.0)
    assert metrics["reward_b_std"] == pytest.approx(math.sqrt(0.8))  # std of (0, 1, 2, 2, 0)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_a_weight_zero_reward_that_abstains_changes_no_advantage(aggregation):
    """A weight-0 reward (a kl_gate monitor, a judge that abstains now and then) is reported, not
    trained on: its NaN made the sample's aggregate 0 * NaN = NaN, zeroed the advantage of group 0's
    best sample and moved the rest of its group."""
    nan = float("nan")
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    main = t([0.1, 0.9, 0.3, 0.5, 0.2, 0.8, 0.4, 0.6])
    alone, _ = compute_advantages({"main": main}, {"main": 1.0}, ids, aggregation=aggregation)
    both, metrics = compute_advantages({"main": main, "monitor": t([1, nan, 2, 3, 4, 5, nan, 6])},
                                       {"main": 1.0, "monitor": 0.0}, ids, aggregation=aggregation)
    assert torch.allclose(both, alone, atol=1e-6) and bool((alone != 0).all())
    assert metrics["reward_monitor_nan_count"] == 2.0 and metrics["reward_monitor_mean"] == pytest.approx(3.5)
    nothing, _ = compute_advantages({"monitor": t([1, nan, 2, 3, 4, 5, nan, 6])}, {"monitor": 0.0}, ids,
                                    aggregation=aggregation)
    assert bool((nothing == 0).all())  # only weight-0 rewards: no signal, and no error


def test_metrics():
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    rewards = {"r": t([1, 3, 2, 2, 0, 4, 9])}
    adv, m = compute_advantages(rewards, {"r": 1.0}, ids, aggregation="sum", global_std=False)
    assert m["reward_r_mean"] == pytest.approx(21 / 7)
    assert m["reward_r_std"] == pytest.approx(float(rewards["r"].double().std(unbiased=False)))
    assert m["reward_nan_count"] == 0.0
    assert m["zero_std_group_fraction"] == pytest.approx(2 / 4)  # group 1 flat, group 3 a singleton
    assert m["adv_abs_mean"] == pytest.approx(float(adv.abs().mean()))
    assert all(isinstance(v, float) for v in m.values())


def test_errors():
    with pytest.raises(ValueError, match="sum, gdpo"):
        compute_advantages({"r": t([1, 2])}, {"r": 1.0}, torch.tensor([0, 0]), aggregation="mean")
    with pytest.raises(ValueError, match="'ocr'"):
        compute_advantages({"pick": t([1, 2]), "ocr": t([1, 2, 3])}, {"pick": 1.0, "ocr": 1.0}, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="without a weight"):
        compute_advantages({"r": t([1, 2])}, {}, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="integer"):
        group_normalize(t([1, 2]), t([0, 0]), global_std=True)
    with pytest.raises(ValueError, match="inf"):
        group_normalize(t([1, float("inf")]), torch.tensor([0, 0]), global_std=True)


def test_std_free_advantages_are_the_group_centred_rewards():
    adv, _ = compute_advantages({"r": t([1, 2, 6, 10, 10, 10])}, {"r": 1.0}, IDS6, scale_by_std=False)
    assert torch.allclose(adv, t([-2, -1, 3, 0, 0, 0]))
    with pytest.raises(ValueError, match="aggregation 'sum'"):
        compute_advantages({"r": t([1, 2, 6, 10, 10, 10])}, {"r": 1.0}, IDS6, aggregation="gdpo", scale_by_std=False)


def test_diversity_scales_positive_advantages_by_the_groups_relative_diversity():
    from trainer.advantages import diversity_scale

    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    inverse = torch.unique(ids, return_inverse=True)[1]
    adv = torch.tensor([-1.5, -0.5, 0.5, 1.5, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    d = torch.tensor([1.0, 2.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0])  # group 0 mean 2; group 1 mean 0 (no scale)
    out = diversity_scale(adv, d, inverse, 2)
    assert torch.allclose(out, torch.tensor([-1.5, -0.5, 0.75, 1.5, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64))
    nan = diversity_scale(adv[:4], torch.tensor([1.0, 2.0, float("nan"), 3.0]), inverse[:4], 1)  # mean of 1, 2, 3 = 2
    assert torch.allclose(nan, torch.tensor([-1.5, -0.5, 0.5, 2.25], dtype=torch.float64))
    # through compute_advantages (std-free, as GARDO): only the positive ones change
    rewards = {"r": t([1, 2, 3, 4, 5, 5, 5, 5])}
    plain, _ = compute_advantages(rewards, {"r": 1.0}, ids, scale_by_std=False)
    shaped, metrics = compute_advantages(rewards, {"r": 1.0}, ids, scale_by_std=False, shaping=d)
    assert torch.allclose(shaped, t([-1.5, -0.5, 0.75, 1.5, 0, 0, 0, 0]))
    assert torch.equal(plain[plain <= 0], shaped[plain <= 0])
    assert metrics["diversity_scale_mean"] == pytest.approx((1.5 + 1.0) / 2)
