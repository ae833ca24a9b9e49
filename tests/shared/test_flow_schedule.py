import math

import pytest
import torch

from shared.flow import exp_time_shift, flow_sigmas, resolution_shift_mu, select_sde_steps, time_shift


def test_time_shift_identity_and_endpoints():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(time_shift(t, 1.0), t)
    for shift in (0.5, 3.0, 10.0):
        assert time_shift(0.0, shift) == 0.0
        assert time_shift(1.0, shift) == pytest.approx(1.0)
        assert (time_shift(t, shift).diff() > 0).all()
    assert time_shift(0.5, 3.0) == pytest.approx(1.5 / 2.0)


def test_time_shift_rejects_bad_shift():
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="shift"):
            time_shift(0.5, bad)


def test_exp_time_shift():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert exp_time_shift(0.0, 1.2) == 0.0
    assert exp_time_shift(1.0, 1.2) == pytest.approx(1.0)
    assert torch.allclose(exp_time_shift(t, 0.0), t)
    assert (exp_time_shift(t, 1.15).diff() > 0).all()
    # Same as the SD3 shift with shift = e^mu, and the FLUX closed form in the interior.
    assert torch.allclose(exp_time_shift(t, 0.8), time_shift(t, math.exp(0.8)))
    assert exp_time_shift(0.3, 0.8) == pytest.approx(math.exp(0.8) / (math.exp(0.8) + (1 / 0.3 - 1)))


def test_resolution_shift_mu():
    assert resolution_shift_mu(256) == pytest.approx(0.5)
    assert resolution_shift_mu(4096) == pytest.approx(1.15)
    assert resolution_shift_mu((256 + 4096) // 2) == pytest.approx((0.5 + 1.15) / 2)
    assert resolution_shift_mu(1024, base_shift=0.0, max_shift=1.0, base_seq_len=0, max_seq_len=2048) == 0.5


@pytest.mark.parametrize("num_steps", [1, 2, 10, 40, 1000])
@pytest.mark.parametrize("kw", [{}, {"shift": 3.0}, {"shift": 0.3}, {"mu": 1.15}])
def test_flow_sigmas_shape_endpoints_monotone(num_steps, kw):
    s = flow_sigmas(num_steps, **kw)
    assert s.shape == (num_steps + 1,) and s.dtype == torch.float32
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert (s.diff() < 0).all()


def test_flow_sigmas_values():
    assert torch.allclose(flow_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # SD3.5 (shift 3): second grid point of the FastVideo grid linspace(1, 0, 11).
    assert flow_sigmas(10, 3.0)[1].item() == pytest.approx(3 * 0.9 / (1 + 2 * 0.9), abs=1e-7)
    mu = resolution_shift_mu(1024)
    expected = exp_time_shift(torch.linspace(1, 0, 9, dtype=torch.float64), mu).float()
    assert torch.allclose(flow_sigmas(8, mu=mu), expected)


def test_flow_sigmas_errors():
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(0)
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(10, -1.0)
    with pytest.raises(ValueError, match="mu"):
        flow_sigmas(10, 3.0, mu=1.0)


def test_select_sde_steps_defaults_and_all():
    assert select_sde_steps(None, None, 10, seed=0) == list(range(9))
    assert select_sde_steps(None, 9, 10, seed=0) == list(range(9))
    assert select_sde_steps(None, 50, 10, seed=0) == list(range(9))
    assert select_sde_steps([5, 1, 3], None, 10, seed=0) == [1, 3, 5]


def test_select_sde_steps_random_subset():
    a = select_sde_steps(None, 4, 16, seed=123)
    assert a == select_sde_steps(None, 4, 16, seed=123)  # deterministic
    assert len(a) == 4 and a == sorted(a) and len(set(a)) == 4
    assert all(0 <= i < 15 for i in a)
    draws = {tuple(select_sde_steps(None, 4, 16, seed=s)) for s in range(20)}
    assert len(draws) > 1  # the seed matters
    b = select_sde_steps([0, 2, 4, 6, 8], 2, 10, seed=7)
    assert set(b) <= {0, 2, 4, 6, 8} and len(b) == 2 and b == sorted(b)
    # Same recipe as Flow-Factory: randperm under a seeded CPU generator.
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(123))[:4]
    assert a == sorted(perm.tolist())


def test_select_sde_steps_errors():
    with pytest.raises(ValueError, match=r"9.*\[0, 9\)"):
        select_sde_steps([0, 9], None, 10, seed=0)  # the last step is not allowed
    with pytest.raises(ValueError, match=r"-1"):
        select_sde_steps([-1], None, 10, seed=0)
    with pytest.raises(ValueError, match="num"):
        select_sde_steps(None, 0, 10, seed=0)
    with pytest.raises(ValueError, match="duplicate"):
        select_sde_steps([1, 1], None, 10, seed=0)
    with pytest.raises(ValueError, match="empty"):
        select_sde_steps([], None, 10, seed=0)
    with pytest.raises(ValueError, match="num_steps"):
        select_sde_steps(None, None, 1, seed=0)


def test_progressive_window_moves_by_stride_every_shift_and_stops_at_the_end():
    """MixGRPO's window: size 4 on 10 steps starts at 0 and may start at most at T - w = 8 - 4 = 4."""
    from shared.flow import progressive_window

    starts = [progressive_window(e, 10, 4, shift_every=2)[0] for e in range(14)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4]
    assert progressive_window(5, 10, 4, shift_every=2) == [2, 3, 4, 5]
    # stride 3: starts 0, 3, then the last start 4 (not 6); roll_back cycles through them
    assert [progressive_window(e, 10, 4, 1, stride=3)[0] for e in range(5)] == [0, 3, 4, 4, 4]
    assert [progressive_window(e, 10, 4, 1, stride=3, roll_back=True)[0] for e in range(7)] == [0, 3, 4, 0, 3, 4, 0]
    # MixGRPO's paper setting: 25 steps, w 4, tau 25, s 1 -> the window reaches steps 19-22 at epoch 475
    assert progressive_window(474, 25, 4, 25) == [18, 19, 20, 21]
    assert progressive_window(475, 25, 4, 25) == progressive_window(10_000, 25, 4, 25) == [19, 20, 21, 22]


def test_progressive_window_errors_name_the_fix():
    from shared.flow import progressive_window

    with pytest.raises(ValueError, match=r"window of 9 steps does not fit 10 steps.*at most 8"):
        progressive_window(0, 10, 9, 1)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        progressive_window(0, 10, 4, 1, stride=0)
