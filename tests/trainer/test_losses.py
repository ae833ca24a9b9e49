"""Closed-form tests of trainer/algorithms/losses.py (pure tensor math, CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.algorithms.losses import (
    awm_log_prob,
    awm_policy_loss,
    clip_advantages,
    clipped_surrogate,
    guard_log_ratio,
    guard_log_ratio_from_logprobs,
    guard_loss_scale,
    kl_v_based,
    kl_x_based,
    mean_d,
    nft_implicit_velocities,
    nft_loss,
    nft_optimality,
    policy_ratio,
)

DT = torch.float64


def gaussian_logprob_mean(x: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-element-mean Gaussian log-density, the convention of the coupled repos (std: [B])."""
    s = std.reshape(-1, *([1] * (x.dim() - 1)))
    lp = -((x - mu) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    return lp.reshape(x.shape[0], -1).mean(1)


# ------------------------------------------------------------------------------------------ clipped surrogate


def test_clipped_surrogate_hand_values_and_gradient():
    ratio = torch.tensor([0.5, 0.95, 1.0, 1.05, 1.5, 0.5, 1.5], dtype=DT, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 2.0, -1.0, 1.0, -1.0, -1.0], dtype=DT)
    loss, m = clipped_surrogate(ratio, adv, 0.1)
    # per-sample max(-A r, -A clamp(r, 0.9, 1.1)):
    per = [-0.5, -0.95, -2.0, 1.05, -1.1, 0.9, 1.5]
    assert loss.item() == pytest.approx(sum(per) / 7, abs=1e-12)
    loss.backward()
    B = 7
    # clipped branch selected (zero grad): A>0 & r>1+hi (idx 4), A<0 & r<1-lo (idx 5); else -A/B
    expected = torch.tensor([-1, -1, -2, 1, 0, 0, 1], dtype=DT) / B
    torch.testing.assert_close(ratio.grad, expected, atol=1e-12, rtol=0)
    assert m["clip_frac"].item() == pytest.approx(4 / 7)
    assert m["clip_frac_low"].item() == pytest.approx(2 / 7)
    assert m["clip_frac_high"].item() == pytest.approx(2 / 7)
    assert m["ratio_mean"].item() == pytest.approx(ratio.detach().mean().item())
    assert m["ratio_min"].item() == 0.5 and m["ratio_max"].item() == 1.5
    assert all(not v.requires_grad for v in m.values())


def test_clipped_surrogate_asymmetric_and_float_equals_pair():
    ratio = torch.tensor([0.7, 0.85, 1.03, 1.1], dtype=DT, requires_grad=True)
    adv = torch.tensor([-2.0, -1.0, 1.0, 3.0], dtype=DT)
    loss, m = clipped_surrogate(ratio, adv, (0.2, 0.05))  # interval [0.8, 1.05]
    # idx0: A<0, r<0.8 -> max(1.4, 1.6)=1.6 clipped; idx1: inside -> 0.85
    # idx2: inside -> -1.03; idx3: A>0, r>1.05 -> max(-3.3, -3.15) = -3.15 clipped
    per = [1.6, 0.85, -1.03, -3.15]
    assert loss.item() == pytest.approx(sum(per) / 4, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(ratio.grad, torch.tensor([0, 1, -1, 0], dtype=DT) / 4, atol=1e-12, rtol=0)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    a, _ = clipped_surrogate(ratio.detach(), adv, 0.1)
    b, _ = clipped_surrogate(ratio.detach(), adv, (0.1, 0.1))
    assert a.item() == b.item()


def test_clipped_surrogate_rejects_bad_input():
    with pytest.raises(ValueError):
        clipped_surrogate(torch.ones(3), torch.ones(3), (-1e-4, 1e-4))
    with pytest.raises(ValueError):
        clipped_surrogate(torch.ones(3), torch.ones(4), 0.1)


def test_clip_advantages():
    a = torch.tensor([-7.0, -3.0, 0.0, 2.0, 9.0])
    torch.testing.assert_close(clip_advantages(a, 5.0), torch.tensor([-5.0, -3.0, 0.0, 2.0, 5.0]))
    torch.testing.assert_close(clip_advantages(a, (2.0, 4.0)), torch.tensor([-2.0, -2.0, 0.0, 2.0, 4.0]))


def test_policy_ratio_stable():
    lp_new = torch.tensor([1e4 + 1e-3, -1e5, 0.0], dtype=DT, requires_grad=True)
    lp_old = torch.tensor([1e4, -1e5, 0.5], dtype=DT)
    r = policy_ratio(lp_new, lp_old)
    torch.testing.assert_close(r, torch.tensor([math.exp(1e-3), 1.0, math.exp(-0.5)], dtype=DT))
    r.sum().backward()
    torch.testing.assert_close(lp_new.grad, r.detach())
    half = policy_ratio(torch.tensor([-3e4], dtype=torch.float16), torch.tensor([-3e4], dtype=torch.float16))
    assert half.dtype == torch.float32 and half.item() == 1.0


# ------------------------------------------------------------------------------------------ KL


def test_kl_x_based_hand_and_zero():
    mu = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=DT)
    mu_ref = torch.tensor([[0.0, 0.0], [0.5, -0.5]], dtype=DT)
    std = torch.tensor([0.5, 0.25], dtype=DT)
    dt = torch.tensor([-0.1, -0.2], dtype=DT)
    # mean_d dmu^2 = [2.5, 0.25]; sigma_t^2 = std^2/|dt| = [2.5, 0.3125]
    exp = torch.tensor([2.5 / (2 * 2.5), 0.25 / (2 * 0.3125)], dtype=DT)
    torch.testing.assert_close(kl_x_based(mu, mu_ref, std, dt, "Flow-SDE"), exp)
    torch.testing.assert_close(kl_x_based(mu, mu_ref, std, dt, "dance_sde"), exp)
    torch.testing.assert_close(kl_x_based(mu, mu_ref, std, dt, "CPS"), torch.tensor([2.5, 0.25], dtype=DT))
    # scalar std / dt broadcast
    torch.testing.assert_close(
        kl_x_based(mu, mu_ref, 0.5, -0.1, "Flow-SDE"), torch.tensor([2.5, 0.25], dtype=DT) * 0.1 / 0.5
    )
    assert torch.all(kl_x_based(mu, mu, std, dt, "Flow-SDE") == 0)
    assert torch.all(kl_x_based(mu, mu, std, dt, "CPS") == 0)
    with pytest.raises(ValueError, match="Flow-SDE"):
        kl_x_based(mu, mu_ref, std, dt, "ODE")


def test_kl_x_based_relation_to_exact_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    B, shape = 3, (3, 4, 5, 5)
    mu = torch.randn(shape, generator=g, dtype=DT)
    mu_ref = mu + 0.1 * torch.randn(shape, generator=g, dtype=DT)
    sigma_t = torch.tensor([0.7, 1.3, 3.5], dtype=DT)
    dt = torch.tensor([-0.04, -0.1, -0.27], dtype=DT)
    std = sigma_t * dt.abs().sqrt()
    s = std.reshape(B, 1, 1, 1).expand(shape)
    kl_elem = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, s), torch.distributions.Normal(mu_ref, s)
    )  # (mu - mu_ref)^2 / (2 std^2), per element
    code = kl_x_based(mu, mu_ref, std, dt, "Flow-SDE")
    # code version = |dt| * per-element mean of the exact KL
    torch.testing.assert_close(code, dt.abs() * mean_d(kl_elem))
    # paper closed form (sum over dims) = code * D / |dt|
    D = mu[0].numel()
    paper = ((mu - mu_ref) ** 2).reshape(B, -1).sum(1) / (2 * std**2)
    torch.testing.assert_close(paper, code * D / dt.abs())
    torch.testing.assert_close(paper, kl_elem.reshape(B, -1).sum(1))


def test_kl_v_based():
    v = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    v_ref = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    torch.testing.assert_close(kl_v_based(v, v_ref), torch.tensor([2.5, 2.0]))


# ------------------------------------------------------------------------------------------ GRPO-Guard


def _guard_setup(seed=0, B=4, shape=(2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    mu_old = torch.randn(B, *shape, generator=g, dtype=DT)
    delta = 0.05 * torch.randn(B, *shape, generator=g, dtype=DT)
    std = torch.tensor([0.7, 0.4, 0.2, 0.01], dtype=DT)[:B]
    eps = torch.randn(B, *shape, generator=g, dtype=DT)
    return mu_old, delta, std, eps


def test_guard_formulas_agree():
    mu_old, delta, std, eps = _guard_setup()
    mu_new = mu_old + delta
    x = mu_old + std.reshape(-1, 1, 1, 1) * eps
    lp_new = gaussian_logprob_mean(x, mu_new, std)
    lp_old = gaussian_logprob_mean(x, mu_old, std)
    a = guard_log_ratio(mu_new, mu_old, x, std)
    b = guard_log_ratio_from_logprobs(lp_new, lp_old, mu_new, mu_old, std)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, mean_d(eps * delta), atol=1e-12, rtol=0)
    # same in float32
    f = lambda t: t.float()  # noqa: E731
    a32 = guard_log_ratio(f(mu_new), f(mu_old), f(x), f(std))
    b32 = guard_log_ratio_from_logprobs(
        gaussian_logprob_mean(f(x), f(mu_new), f(std)), gaussian_logprob_mean(f(x), f(mu_old), f(std)),
        f(mu_new), f(mu_old), f(std),
    )
    torch.testing.assert_close(a32, b32, atol=1e-5, rtol=0)


def test_guard_removes_negative_bias():
    mu_old, delta, std, eps = _guard_setup()
    s = std.reshape(-1, 1, 1, 1)
    # equal means: both the plain and the guard log-ratio are 0
    x = mu_old + s * eps
    lp = gaussian_logprob_mean(x, mu_old, std)
    assert torch.all(guard_log_ratio(mu_old, mu_old, x, std) == 0)
    assert torch.all(lp - lp == 0)
    # mu_new = mu_old + delta: exact antithetic average over (eps, -eps) isolates the bias
    mu_new = mu_old + delta
    bias = -mean_d(delta**2) / (2 * std**2)
    plain, guard = [], []
    for e in (eps, -eps):
        xe = mu_old + s * e
        plain.append(gaussian_logprob_mean(xe, mu_new, std) - gaussian_logprob_mean(xe, mu_old, std))
        guard.append(guard_log_ratio(mu_new, mu_old, xe, std))
        # exact decomposition for a fixed eps: plain = guard / std + bias
        torch.testing.assert_close(plain[-1], guard[-1] / std + bias)
    torch.testing.assert_close((plain[0] + plain[1]) / 2, bias)
    torch.testing.assert_close((guard[0] + guard[1]) / 2, torch.zeros_like(bias), atol=1e-12, rtol=0)
    assert torch.all(bias < 0)
    # Monte Carlo: E[plain] = bias (< 0), E[guard] = 0
    g = torch.Generator().manual_seed(1)
    N = 4000
    eps_n = torch.randn(N, *mu_old.shape[1:], generator=g, dtype=DT)
    i = 2  # one sample (std 0.2), repeated N times
    mo = mu_old[i].expand_as(eps_n)
    mn = mu_new[i].expand_as(eps_n)
    st = std[i].expand(N)
    xn = mo + std[i] * eps_n
    plain_n = gaussian_logprob_mean(xn, mn, st) - gaussian_logprob_mean(xn, mo, st)
    guard_n = guard_log_ratio(mn, mo, xn, st)
    se_plain = plain_n.std() / math.sqrt(N)
    assert abs(plain_n.mean() - bias[i]) < 4 * se_plain
    assert abs(guard_n.mean()) < 4 * guard_n.std() / math.sqrt(N)


def test_guard_gradient_flows_only_through_mean_new():
    mu_old, delta, std, eps = _guard_setup()
    mu_new = (mu_old + delta).requires_grad_(True)
    x = mu_old + std.reshape(-1, 1, 1, 1) * eps
    guard_log_ratio(mu_new, mu_old, x, std).sum().backward()
    D = mu_old[0].numel()
    torch.testing.assert_close(mu_new.grad, eps / D)


def test_guard_loss_scale():
    assert guard_loss_scale(-0.04).item() == pytest.approx(25.0)
    dt = torch.full((5,), -0.1, dtype=DT)
    assert guard_loss_scale(dt).item() == pytest.approx(10.0)
    # batch-shared step: 1/mean|dt| == 1/mean(sqrt|dt|)^2 (peer form)
    assert guard_loss_scale(dt).item() == pytest.approx(1 / dt.abs().sqrt().mean().item() ** 2)


# ------------------------------------------------------------------------------------------ DiffusionNFT


def test_nft_optimality():
    a = torch.tensor([-10.0, -5.0, -2.5, 0.0, 1.0, 5.0, 7.0])
    torch.testing.assert_close(nft_optimality(a, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0]))
    # official form r = A/5/2 + 0.5 inside the clip range
    a_in = torch.linspace(-5, 5, 11)
    torch.testing.assert_close(nft_optimality(a_in, 5.0), a_in / 5 / 2 + 0.5)
    with pytest.raises(ValueError):
        nft_optimality(a, 0.0)


def test_nft_implicit_velocities_collapse_when_equal():
    v = torch.randn(3, 4, dtype=DT)
    vp, vn = nft_implicit_velocities(v, v.clone(), 0.7)
    torch.testing.assert_close(vp, v)
    torch.testing.assert_close(vn, v)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, generator=g, dtype=DT)
    eps = torch.randn(3, 4, generator=g, dtype=DT)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=DT)
    xt = (1 - t[:, None]) * x0 + t[:, None] * eps
    r = torch.tensor([0.1, 0.5, 1.0], dtype=DT)
    loss, m = nft_loss(v, v.clone(), xt, x0, t, r, beta=0.7, adv_clip_max=5.0)
    assert m["loss_pos"].item() == pytest.approx(m["loss_neg"].item())
    # with v+ = v- = v_old, loss = c * mean(L) / beta, independent of r
    err = xt - t[:, None] * v - x0
    L = (err**2).mean(1) / err.abs().mean(1)
    assert loss.item() == pytest.approx((5.0 * L / 0.7).mean().item())


def test_nft_loss_tiny_closed_form():
    x0 = torch.tensor([[1.0, -1.0]], dtype=DT)
    eps = torch.tensor([[0.5, 0.5]], dtype=DT)
    t = torch.tensor([0.5], dtype=DT)
    xt = 0.5 * x0 + 0.5 * eps  # [0.75, -0.25]
    v_old = torch.zeros(1, 2, dtype=DT)
    v_theta = torch.ones(1, 2, dtype=DT)
    # beta=0.5: v+ = [0.5,0.5], v- = [-0.5,-0.5]; x0+ - x0 = [-0.5,0.5] -> w+=0.5, L+=0.25/0.5=0.5
    # x0- - x0 = [0, 1] -> w-=0.5, L-=0.5/0.5=1.0 ; loss = 5*(0.75*0.5+0.25*1.0)/0.5 = 6.25
    loss, m = nft_loss(v_theta, v_old, xt, x0, t, torch.tensor([0.75], dtype=DT), beta=0.5, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(6.25)
    assert m["loss_pos"].item() == pytest.approx(0.5)
    assert m["loss_neg"].item() == pytest.approx(1.0)
    # float t and [B,1] t give the same
    loss2, _ = nft_loss(v_theta, v_old, xt, x0, 0.5, torch.tensor([0.75], dtype=DT), beta=0.5, adv_clip_max=5.0)
    assert loss2.item() == pytest.approx(6.25)


@pytest.mark.parametrize("r_val", [1.0, 0.0])
def test_nft_gradient_direction(r_val):
    g = torch.Generator().manual_seed(7)
    B, shape = 4, (4, 3, 5)
    x0 = torch.randn(shape, generator=g, dtype=DT)
    eps = torch.randn(shape, generator=g, dtype=DT)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=DT)
    tb = t.reshape(B, 1, 1)
    xt = (1 - tb) * x0 + tb * eps
    target = eps - x0
    v_old = target + 0.5 * torch.randn(shape, generator=g, dtype=DT)
    v_theta = (v_old + 0.3 * torch.randn(shape, generator=g, dtype=DT)).requires_grad_(True)
    beta = 0.5
    r = torch.full((B,), r_val, dtype=DT)
    loss, _ = nft_loss(v_theta, v_old, xt, x0, t, r, beta=beta, adv_clip_max=5.0)
    loss.backward()
    vp, vn = nft_implicit_velocities(v_theta.detach(), v_old, beta)
    v_trained = vp if r_val == 1.0 else vn  # r=1 pulls v+, r=0 pulls v-, toward the target
    # gradient w.r.t. v_theta is a positive (r=1) / negative (r=0) multiple of (v± - target), per sample
    cos = torch.nn.functional.cosine_similarity(v_theta.grad.reshape(B, -1), (v_trained - target).reshape(B, -1))
    torch.testing.assert_close(cos, torch.full((B,), 1.0 if r_val == 1.0 else -1.0, dtype=DT))
    before = ((v_trained - target) ** 2).reshape(B, -1).sum(1)
    with torch.no_grad():
        v_new = v_theta - 1e-3 * v_theta.grad
    vp2, vn2 = nft_implicit_velocities(v_new, v_old, beta)
    after = (((vp2 if r_val == 1.0 else vn2) - target) ** 2).reshape(B, -1).sum(1)
    assert torch.all(after < before)
    if r_val == 1.0:  # positive samples move v_theta itself toward the target when v_old is off
        assert ((v_new - target) ** 2).sum() < ((v_theta.detach() - target) ** 2).sum()


# ------------------------------------------------------------------------------------------ AWM


def test_awm_weightings_closed_forms():
    v = torch.tensor([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])
    tgt = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([0.5, 0.2, 0.9])
    l = torch.tensor([2.5, 0.0, 4.0], dtype=DT)
    td = t.to(DT)
    cases = {
        "Uniform": -l,
        "uniform": -l,
        "t": -td * l,
        "t**2": -(td**2) * l,
        "huber": -td * (torch.sqrt(l + 1e-10) - 1e-5),
        "ghuber": -(td / 0.25) * ((l + 1e-10) ** 0.25 - 1e-10**0.25),
    }
    for name, exp in cases.items():
        out = awm_log_prob(v, tgt, t, name)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, exp, msg=name)
    # huber and ghuber are exactly 0 at zero error
    assert awm_log_prob(v, tgt, t, "huber")[1].item() == 0.0
    assert awm_log_prob(v, tgt, t, "ghuber")[1].item() == 0.0
    # ghuber with p = 1 is the "t" weighting up to the 1e-10 constants
    torch.testing.assert_close(awm_log_prob(v, tgt, t, "ghuber", ghuber_power=1.0), -td * l, atol=1e-12, rtol=0)
    # huber with sqrt: t*(sqrt(l)) for l >> 1e-10
    torch.testing.assert_close(awm_log_prob(v, tgt, t, "huber"), -td * l.sqrt(), atol=1e-5, rtol=0)


def test_awm_unknown_weighting_raises():
    v = torch.zeros(2, 3)
    with pytest.raises(ValueError) as ei:
        awm_log_prob(v, v, 0.5, "elbo")
    for name in ("Uniform", "t", "t**2", "huber", "ghuber"):
        assert name in str(ei.value)


def test_awm_policy_loss_on_policy_is_advantage_weighted_fm():
    g = torch.Generator().manual_seed(5)
    B = 4
    v = torch.randn(B, 6, generator=g, dtype=DT, requires_grad=True)
    tgt = torch.randn(B, 6, generator=g, dtype=DT)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=DT)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=DT)
    logp = awm_log_prob(v, tgt, t, "t")
    loss, m = awm_policy_loss(logp, logp.detach(), adv, 1.0)
    assert m["ratio_mean"].item() == 1.0 and m["clip_frac"].item() == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item())
    loss.backward()
    # grad of mean_b(-A * exp(logp - sg logp)) = mean_b(A * t * grad mean_d (v - tgt)^2)
    exp_grad = (adv * t)[:, None] * 2 * (v.detach() - tgt) / 6 / B
    torch.testing.assert_close(v.grad, exp_grad)
