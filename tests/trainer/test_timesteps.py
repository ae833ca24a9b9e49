"""Training-sigma sampling: shapes, ranges, per-sample stratification, discrete grids, shift."""

import math

import pytest
import torch

from trainer.timesteps import STRATEGIES, sample_train_sigmas, sd3_time_shift

N_STEPS = 10


def sd3_grid(n=N_STEPS, shift=3.0):
    """The shifted rollout grid [n + 1], descending from 1 to 0 (last entry 0)."""
    return sd3_time_shift(torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64), shift).float()


def draw(strategy, num=4, batch=64, seed=0, **kw):
    kw.setdefault("grid", sd3_grid())
    return sample_train_sigmas(strategy, num, batch, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fraction", [1.0, 0.6])
def test_shape_dtype_range(strategy, fraction):
    s = draw(strategy, num=3, batch=17, timestep_fraction=fraction)
    assert s.shape == (3, 17) and s.dtype == torch.float32
    assert bool((s > 0).all() and (s <= 1).all())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_seeded_generator_is_deterministic(strategy):
    assert torch.equal(draw(strategy, seed=3), draw(strategy, seed=3))
    assert not torch.equal(draw(strategy, seed=3), draw(strategy, seed=4))


def test_samples_get_their_own_timesteps():
    s = draw("uniform", num=4, batch=8)
    assert not all(torch.equal(s[:, 0], s[:, b]) for b in range(1, 8))


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_uniform_one_pick_per_stratum(fraction):
    num = 5
    s = draw("uniform", num=num, batch=200, timestep_fraction=fraction).double()
    u = (1.0 - s) / fraction  # invert sigma = 1 - fraction * u (no shift)
    strata = torch.sort(torch.floor(u * num).clamp(max=num - 1), dim=0).values
    assert torch.equal(strata, torch.arange(num, dtype=torch.float64).unsqueeze(1).expand(num, 200))
    assert float(s.min()) >= 1 - fraction - 1e-6


def test_logit_normal_one_pick_per_stratum():
    num = 4
    s = draw("logit_normal", num=num, batch=200).double()
    u = torch.special.ndtr(torch.logit(s))  # invert sigma = sigmoid(Phi^-1(u))
    strata = torch.sort(torch.floor(u * num).clamp(max=num - 1), dim=0).values
    assert torch.equal(strata, torch.arange(num, dtype=torch.float64).unsqueeze(1).expand(num, 200))


def test_logit_normal_fraction_restricts_range():
    s = draw("logit_normal", num=8, batch=100, timestep_fraction=0.3)
    assert float(s.min()) >= 0.7 - 1e-6


def test_rows_are_shuffled_per_sample():
    s = draw("uniform", num=4, batch=200)
    noisiest_row = s.argmax(dim=0)
    assert len(set(noisiest_row.tolist())) == 4  # not always the same row


@pytest.mark.parametrize("strategy", ["uniform", "logit_normal"])
def test_time_shift_raises_mean_sigma(strategy):
    plain = draw(strategy, num=8, batch=256).mean()
    shifted = draw(strategy, num=8, batch=256, time_shift=3.0).mean()
    assert shifted > plain + 0.05


def test_time_shift_is_sd3_formula():
    plain = draw("uniform", seed=7)
    shifted = draw("uniform", seed=7, time_shift=3.0)
    keep = plain > 2e-3  # below that the unshifted draw was clamped to 1e-3 first
    assert torch.allclose(shifted[keep], (3 * plain / (1 + 2 * plain))[keep], atol=1e-6)


def test_clamped_to_sigma_min():
    s = draw("uniform", num=50, batch=50, time_shift=0.01)
    assert float(s.min()) >= 1e-3


def _grid_index(s, grid):
    """Index of each value in the grid (asserting it is a grid value)."""
    hit = (s.unsqueeze(-1) == grid).int()
    assert bool((hit.sum(-1) == 1).all()), "value not on the grid"
    return hit.argmax(-1)


@pytest.mark.parametrize(
    "strategy, fraction, lo, n_max",
    [
        ("discrete", 1.0, 0, 10),
        ("discrete", 0.5, 0, 5),
        ("discrete_wo_init", 1.0, 1, 10),
        ("discrete_wo_init", 0.7, 1, 7),
    ],
)
def test_discrete_values_from_grid_and_stratified(strategy, fraction, lo, n_max):
    grid, num = sd3_grid(), 3
    s = draw(strategy, num=num, batch=100, timestep_fraction=fraction, time_shift=5.0)  # shift ignored
    idx = _grid_index(s, grid)
    assert int(idx.min()) >= lo and int(idx.max()) < n_max
    bounds = torch.linspace(lo, n_max, num + 1).floor().long()
    sorted_idx = idx.sort(dim=0).values
    for k in range(num):  # one pick per stratum [bounds[k], bounds[k+1])
        assert bool(((sorted_idx[k] >= bounds[k]) & (sorted_idx[k] < bounds[k + 1])).all())
    assert len(set(idx.flatten().tolist())) == n_max - lo  # every candidate reachable


def test_discrete_with_init_always_has_grid0():
    grid = sd3_grid()
    s = draw("discrete_with_init", num=4, batch=100, timestep_fraction=0.8)
    idx = _grid_index(s, grid)
    assert bool((idx == 0).sum(0).eq(1).all())  # index 0 exactly once per sample
    rest = idx.sort(dim=0).values[1:]
    bounds = torch.linspace(1, 8, 4).floor().long()  # 3 strata over [1, 8)
    for k in range(3):
        assert bool(((rest[k] >= bounds[k]) & (rest[k] < bounds[k + 1])).all())


def test_discrete_wo_init_never_has_grid0():
    s = draw("discrete_wo_init", num=6, batch=100)
    assert not bool((s == sd3_grid()[0]).any())


def test_discrete_ignores_time_shift():
    assert torch.equal(draw("discrete", seed=1), draw("discrete", seed=1, time_shift=3.0))


def test_more_picks_than_candidates_repeat():
    s = draw("discrete", num=5, batch=20, timestep_fraction=0.3)  # 3 candidates
    idx = _grid_index(s, sd3_grid())
    assert int(idx.max()) <= 2
    for b in range(20):
        assert set(idx[:, b].tolist()) == {0, 1, 2}


def test_with_init_single_candidate_repeats_index0():
    s = draw("discrete_with_init", num=3, batch=4, timestep_fraction=0.1)  # n_max = 1
    assert bool((s == sd3_grid()[0]).all())


def test_wo_init_too_few_candidates_explains_fix():
    with pytest.raises(ValueError, match="timestep_fraction to at least 0.2"):
        draw("discrete_wo_init", timestep_fraction=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strategy": "beta"}, "uniform, logit_normal"),
        ({"num": 0}, "num"),
        ({"timestep_fraction": 0.0}, "timestep_fraction"),
        ({"timestep_fraction": 1.5}, "timestep_fraction"),
        ({"time_shift": 0.0}, "time_shift"),
        ({"grid": torch.linspace(0, 1, 11)}, "descending"),
    ],
)
def test_validation(kwargs, match):
    args = {"strategy": "uniform", "num": 2} | kwargs
    strategy, num = args.pop("strategy"), args.pop("num")
    with pytest.raises(ValueError, match=match):
        draw(strategy, num=num, **args)


def test_fraction_rounding_is_robust():
    # int(100 * 0.29) would be 28 in floating point; we want 29 candidates
    grid = sd3_grid(100)
    s = draw("discrete", num=29, batch=1, grid=grid, timestep_fraction=0.29)
    assert int(_grid_index(s, grid).max()) == 28
    assert math.isclose(float(s.max()), 1.0)


def test_the_decoupled_trainers_train_as_many_timesteps_as_there_are_candidates(tmp_path):
    """100 steps x timestep_fraction 0.29: 29 candidate steps, and 29 trained units (int() of the float
    product 28.999... gave 28 units for strata built over 29)."""
    from tests.helpers.tiny import tiny_config
    from trainer.algorithms import ALGORITHMS

    cfg = tiny_config(tmp_path, "nft", ["train.num_inference_steps=100", "train.timestep_fraction=0.29",
                                        "train.num_train_timesteps=null"])
    assert ALGORITHMS.get("nft")(cfg).num_units(0) == 29
