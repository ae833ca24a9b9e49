import math

import pytest
import torch

from shared.flow import DYNAMICS, StepOutput, flow_sigmas, gaussian_log_prob, sde_step
from shared.flow.sde import reduce_over_latent

B, SHAPE = 3, (3, 4, 2, 5)
SDES = ("Flow-SDE", "Dance-SDE", "CPS")


def make(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen).to(dtype)
    v = torch.randn(SHAPE, generator=gen).to(dtype)
    return x, v


def per_sample(t):
    return t.view(-1, 1, 1, 1)


SIGMA = torch.tensor([0.9, 0.5, 0.2])
SIGMA_NEXT = torch.tensor([0.8, 0.45, 0.0])


def test_output_contract():
    x, v = make()
    out = sde_step(x, v, SIGMA, SIGMA_NEXT, dynamics="Flow-SDE", noise_level=0.7)
    assert isinstance(out, StepOutput)
    assert out.prev_sample.shape == SHAPE and out.prev_sample.dtype == x.dtype
    assert out.mean.shape == SHAPE and out.mean.dtype == torch.float32
    assert out.std.shape == (B,) and out.std.dtype == torch.float32
    assert out.log_prob.shape == (B,) and out.log_prob.dtype == torch.float32
    assert out.noise.shape == SHAPE and out.noise.dtype == torch.float32
    assert torch.allclose(out.prev_sample, out.mean + per_sample(out.std) * out.noise, atol=1e-6)


@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_zero_noise_is_euler_step(dynamics):
    x, v = make()
    euler = x + v * per_sample(SIGMA_NEXT - SIGMA)
    out = sde_step(x, v, SIGMA, SIGMA_NEXT, dynamics=dynamics, noise_level=0.0)
    assert torch.equal(out.mean, euler) and torch.equal(out.prev_sample, euler)
    assert torch.equal(out.std, torch.zeros(B)) and out.log_prob is None and out.noise is None


def test_ode_ignores_noise_level_and_keeps_given_prev_sample():
    x, v = make()
    out = sde_step(x, v, 0.5, 0.4, dynamics="ODE", noise_level=0.9)
    dt = torch.tensor(0.4) - torch.tensor(0.5)  # dt is formed in float32
    assert torch.equal(out.prev_sample, x + v * dt) and out.log_prob is None
    stored = torch.randn(SHAPE)
    assert sde_step(x, v, 0.5, 0.4, dynamics="ODE", noise_level=0.0, prev_sample=stored).prev_sample is stored


def test_cps_formula_at_eta_zero_is_euler():
    # The CPS mean at eta = 0 is algebraically the Euler step (the code short-cuts noise_level == 0,
    # so check the formula at a tiny eta instead).
    x, v = make()
    out = sde_step(x, v, SIGMA, SIGMA_NEXT, dynamics="CPS", noise_level=1e-6)
    assert torch.allclose(out.mean, x + v * per_sample(SIGMA_NEXT - SIGMA), atol=1e-5)


@pytest.mark.parametrize("dynamics,kw", [("Flow-SDE", {}), ("Dance-SDE", {}), ("CPS", {"cps_log_prob": "gaussian"})])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_matches_torch_normal(dynamics, kw, reduction):
    x, v = make(1)
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.45, 0.1])
    out = sde_step(x, v, sigma, sigma_next, dynamics=dynamics, noise_level=0.6, log_prob_reduction=reduction, **kw)
    ref = torch.distributions.Normal(out.mean, per_sample(out.std)).log_prob(out.prev_sample)
    ref = ref.mean(dim=(1, 2, 3)) if reduction == "mean" else ref.sum(dim=(1, 2, 3))
    assert torch.allclose(out.log_prob, ref, rtol=1e-5, atol=1e-5)
    # The samples differ per row (per-sample sigma really is per sample).
    assert len(set(out.std.tolist())) == B


def test_flow_sde_and_dance_sde_formulas():
    x, v = make(2)
    s, sn, a = per_sample(SIGMA), per_sample(SIGMA_NEXT), 0.7
    dt = sn - s
    out = sde_step(x, v, SIGMA, SIGMA_NEXT, dynamics="Flow-SDE", noise_level=a)
    g = a * torch.sqrt(s / (1 - s))
    mean = x * (1 + g**2 / (2 * s) * dt) + v * (1 + g**2 * (1 - s) / (2 * s)) * dt
    assert torch.allclose(out.mean, mean, atol=1e-5)
    assert torch.allclose(out.std, (g * torch.sqrt(-dt)).flatten(), atol=1e-6)

    eta = 0.3
    out = sde_step(x, v, SIGMA, SIGMA_NEXT, dynamics="Dance-SDE", noise_level=eta)
    x0_hat = x - s * v
    score = -(x - (1 - s) * x0_hat) / s**2
    assert torch.allclose(out.mean, x + dt * v - 0.5 * eta**2 * score * dt, atol=1e-5)  # DanceGRPO flux_step
    assert torch.allclose(out.std, (eta * torch.sqrt(-dt)).flatten(), atol=1e-6)


def test_flow_sde_at_sigma_one_uses_sigma_next():
    x, v = make(3)
    sigmas = flow_sigmas(10, 3.0)
    out = sde_step(x, v, sigmas[0], sigmas[1], dynamics="Flow-SDE", noise_level=0.7)
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.log_prob).all()
    sn = sigmas[1].item()
    g = 0.7 * math.sqrt(1.0 / (1 - sn))
    assert out.std[0].item() == pytest.approx(g * math.sqrt(1 - sn), rel=1e-5)
    assert out.std[0].item() == pytest.approx(0.7, rel=1e-5)  # so step 0 has std exactly a
    mean = x * (1 + g**2 / 2 * (sn - 1)) + v * (sn - 1)
    assert torch.allclose(out.mean, mean, atol=1e-5)


def test_cps_unnormalized_log_prob():
    x, v = make(4)
    for reduction in ("mean", "sum"):
        out = sde_step(x, v, SIGMA, SIGMA_NEXT, dynamics="CPS", noise_level=0.8, log_prob_reduction=reduction)
        sq = (out.prev_sample - out.mean) ** 2
        ref = -(sq.mean(dim=(1, 2, 3)) if reduction == "mean" else sq.sum(dim=(1, 2, 3)))
        assert torch.allclose(out.log_prob, ref, atol=1e-6)
    # std = sigma_next * sin(eta pi / 2); the last row ends at sigma_next = 0: std 0, log_prob 0, noise 0.
    assert torch.allclose(out.std, SIGMA_NEXT * math.sin(0.4 * math.pi))
    assert out.std[2] == 0 and out.log_prob[2] == 0 and (out.noise[2] == 0).all()


@pytest.mark.parametrize("eta", [0.1, 0.5, 0.8, 1.0])
def test_cps_coefficients_preserving(eta):
    # With x = sigma and v = 1 we get x0_hat = 0 and eps_hat = 1, so the mean *is* the noise coefficient c
    # in mean = (1 - sigma_next) x0_hat + c eps_hat; check c^2 + s^2 == sigma_next^2.
    sigma = torch.tensor([1.0, 0.9, 0.6, 0.3, 0.05])
    sigma_next = torch.tensor([0.95, 0.7, 0.6, 0.1, 0.0])
    x = sigma.view(-1, 1).expand(-1, 4).clone()
    v = torch.ones_like(x)
    out = sde_step(x, v, sigma, sigma_next, dynamics="CPS", noise_level=eta)
    c = out.mean[:, 0]
    assert torch.allclose(out.mean, c.view(-1, 1).expand_as(x))
    assert torch.allclose(c**2 + out.std**2, sigma_next**2, atol=1e-6)
    assert (c >= -1e-7).all()
    # And the data coefficient: x = 1 + sigma, v = 1 gives x0_hat = 1, eps_hat = 2.
    out2 = sde_step(x + 1, v, sigma, sigma_next, dynamics="CPS", noise_level=eta)
    assert torch.allclose(out2.mean[:, 0], (1 - sigma_next) + 2 * c, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dynamics,kw", [("Flow-SDE", {}), ("Dance-SDE", {}), ("CPS", {}), ("CPS", {"cps_log_prob": "gaussian"})])
def test_replay_gives_identical_log_prob(dtype, dynamics, kw):
    x, v = make(5, dtype)
    gen = torch.Generator().manual_seed(11)
    sigma, sigma_next = torch.tensor([1.0, 0.5, 0.3]), torch.tensor([0.9, 0.45, 0.1])
    out = sde_step(x, v, sigma, sigma_next, dynamics=dynamics, noise_level=0.7, generator=gen, **kw)
    assert out.prev_sample.dtype == dtype
    replay = sde_step(x, v, sigma, sigma_next, dynamics=dynamics, noise_level=0.7, prev_sample=out.prev_sample, **kw)
    assert replay.prev_sample is out.prev_sample
    assert torch.allclose(replay.log_prob, out.log_prob, rtol=0, atol=1e-6)
    assert torch.allclose(replay.noise, out.noise, atol=1e-6)
    # The realized noise is that of the stored (cast) sample, not of the float32 draw.
    assert torch.allclose(out.noise, (out.prev_sample.float() - out.mean) / per_sample(out.std), atol=1e-5)


def test_noise_and_generator_are_used():
    x, v = make(6)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    out = sde_step(x, v, 0.7, 0.6, dynamics="Dance-SDE", noise_level=0.3, noise=z)
    assert torch.allclose(out.noise, z, atol=1e-5)
    a = sde_step(x, v, 0.7, 0.6, dynamics="Dance-SDE", noise_level=0.3, generator=torch.Generator().manual_seed(1))
    b = sde_step(x, v, 0.7, 0.6, dynamics="Dance-SDE", noise_level=0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.prev_sample, b.prev_sample)


def test_sigma_forms_agree():
    x, v = make(7)
    kw = dict(dynamics="Flow-SDE", noise_level=0.7, noise=torch.zeros(SHAPE))
    a = sde_step(x, v, 0.7, 0.6, **kw)
    b = sde_step(x, v, torch.tensor(0.7), torch.tensor(0.6), **kw)
    c = sde_step(x, v, torch.full((B,), 0.7), torch.full((B,), 0.6), **kw)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.mean, c.mean) and torch.equal(a.log_prob, c.log_prob)


def test_gaussian_log_prob_and_reduce():
    x, mean = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    std = torch.tensor([0.5, 2.0])
    ref = torch.distributions.Normal(mean, std.view(2, 1, 1)).log_prob(x)
    assert torch.allclose(gaussian_log_prob(x, mean, std), ref.mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(gaussian_log_prob(x, mean, std, "sum"), ref.sum(dim=(1, 2)), atol=1e-5)
    assert torch.allclose(gaussian_log_prob(x, mean, std.view(2, 1, 1)), ref.mean(dim=(1, 2)), atol=1e-6)
    assert reduce_over_latent(torch.ones(2, 3), "sum").tolist() == [3.0, 3.0]
    with pytest.raises(ValueError, match="mean.*sum"):
        reduce_over_latent(torch.ones(2, 3), "max")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dynamics="DDIM", noise_level=0.5), r"dynamics.*Flow-SDE"),
        (dict(dynamics="Flow-SDE", noise_level=-0.1), "noise_level"),
        (dict(dynamics="CPS", noise_level=1.5), "noise_level"),
        (dict(dynamics="Flow-SDE", noise_level=0.5, log_prob_reduction="max"), "log_prob_reduction"),
        (dict(dynamics="CPS", noise_level=0.5, cps_log_prob="exact"), "cps_log_prob"),
        (dict(dynamics="Flow-SDE", noise_level=0.5, sigma=0.5, sigma_next=0.6), "sigma_next"),
        (dict(dynamics="Flow-SDE", noise_level=0.5, sigma=1.5, sigma_next=0.6), "sigma"),
        (dict(dynamics="Flow-SDE", noise_level=0.5, sigma=torch.ones(2), sigma_next=0.6), "sigma"),
        (dict(dynamics="Dance-SDE", noise_level=0.5, sigma=0.0, sigma_next=0.0), "sigma"),
        (dict(dynamics="Flow-SDE", noise_level=0.5, sigma=1.0, sigma_next=1.0), "sigma_next"),
        (dict(dynamics="Flow-SDE", noise_level=0.5, noise=torch.zeros(2)), "noise"),
        (dict(dynamics="Flow-SDE", noise_level=0.5, prev_sample=torch.zeros(2)), "prev_sample"),
        (dict(dynamics="Flow-SDE", noise_level=0.5, v=torch.zeros(2)), "v"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    x, v = make()
    args = dict(x=x, v=v, sigma=0.5, sigma_next=0.4)
    args.update(kwargs)
    pos = [args.pop(k) for k in ("x", "v", "sigma", "sigma_next")]
    with pytest.raises(ValueError, match=match):
        sde_step(*pos, **args)
