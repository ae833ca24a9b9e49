"""MixGRPO-Flash's deterministic tail (shared/flow/solvers.py, ``rollout(tail_solver=...)``,
``train.ode_tail``): the coarser grid after the last SDE step, DPM-Solver++ against the exact
probability-flow ODE of Gaussian data, and rollouts whose SDE steps are untouched."""

from __future__ import annotations

import math

import pytest
import torch

from shared.flow.solvers import dpm_solver_pp_step, tail_grid

M, S = 0.7, 0.3  # data N(M, S^2): the flow x_t = (1 - t) x0 + t eps has closed forms


def posterior_x0(x: torch.Tensor, t: float) -> torch.Tensor:
    """E[x0 | x_t = x] for data N(M, S^2): what a perfect flow model predicts (x - t v)."""
    var = (1 - t) ** 2 * S ** 2 + t ** 2
    return M + (1 - t) * S ** 2 / var * (x - (1 - t) * M)


def exact(x1: torch.Tensor, t: float) -> torch.Tensor:
    """The ODE's state at t from x1 at t = 1: the standardized value is kept (1-D Gaussian)."""
    return (1 - t) * M + math.sqrt((1 - t) ** 2 * S ** 2 + t ** 2) * x1


def solve(x1: torch.Tensor, grid: list[float], solver: str) -> torch.Tensor:
    x, prev = x1.clone(), None
    for s, s_next in zip(grid[:-1], grid[1:]):
        x0 = posterior_x0(x, s)
        if solver == "euler":
            x = x + (s_next - s) * (x - x0) / s
        else:
            x = dpm_solver_pp_step(x, x0, s, s_next, *(prev or (None, None)))
        prev = (x0, s)
    return x


def test_dpm_solver_pp_is_second_order_and_euler_first():
    x1 = torch.linspace(-2, 2, 9, dtype=torch.float64)
    errors = {solver: [(solve(x1, torch.linspace(1, 0.2, n + 1, dtype=torch.float64).tolist(), solver)
                        - exact(x1, 0.2)).abs().max().item() for n in (8, 16, 32, 64)]
              for solver in ("euler", "dpm_solver++")}
    for solver, order in (("euler", 1), ("dpm_solver++", 2)):
        ratios = [a / b for a, b in zip(errors[solver][:-1], errors[solver][1:])]
        assert all(abs(math.log2(r) - order) < 0.4 for r in ratios[1:]), (solver, errors[solver])
    assert errors["dpm_solver++"][2] < errors["euler"][2] / 20


def test_dpm_solver_pp_step_special_cases():
    x, x0 = torch.tensor([0.3, -1.0]), torch.tensor([0.5, 0.1])
    # the last step lands on the prediction; from t = 1 (lambda = -inf) the history is not used
    assert torch.equal(dpm_solver_pp_step(x, x0, 0.2, 0.0, x0 * 3, 0.4), x0)
    first = dpm_solver_pp_step(x, x0, 0.6, 0.3)
    assert torch.allclose(first, 0.3 / 0.6 * x + (0.7 - 0.3 * 0.4 / 0.6) * x0)  # DDIM in x0 prediction
    assert torch.equal(dpm_solver_pp_step(x, x0, 0.6, 0.3, x0 * 3, 1.0), first)
    assert torch.equal(dpm_solver_pp_step(x, x0, 0.6, 0.3, x0, 0.8), first)  # an unchanged prediction: no correction
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        dpm_solver_pp_step(x, x0, 0.3, 0.6)


def test_tail_grid():
    grid = torch.linspace(1, 0, 11)  # 10 steps
    cut = tail_grid(grid, 3, 0.7)  # 6 steps (7 points) after step 3 -> floor(4.9) - 1 = 3 steps: indices 4, 6, 8, 10
    assert torch.equal(cut, torch.cat([grid[:4], grid[[4, 6, 8, 10]]]))
    # MixGRPO-Flash's counts on its 25-step grid at 0.4 (int(max((N - last) * r, 1)) points), never below one step
    assert [tail_grid(torch.linspace(1, 0, 26), last, 0.4).shape[0] - last - 2 for last in (3, 10, 20, 22)] == [
        7, 5, 1, 1]
    assert torch.equal(tail_grid(grid, 3, 1.0), grid)
    assert torch.equal(tail_grid(grid, 9, 0.2), grid)  # no step after the last SDE step
    assert torch.equal(tail_grid(grid, 0, 0.01), torch.cat([grid[:1], grid[[1, 10]]]))  # at least one step
    with pytest.raises(ValueError, match="ratio"):
        tail_grid(grid, 3, 0.0)
    with pytest.raises(ValueError, match="not a step"):
        tail_grid(grid, 10, 0.5)


def test_rollout_tail_keeps_the_sde_steps_and_runs_fewer_forwards():
    """The SDE steps (states, log-probs, stds, sigmas) are those of the full rollout; the tail runs
    floor(0.6 * 7) - 1 = 3 forwards instead of 6; Euler at ratio 1 is the plain rollout exactly."""
    from shared.models import load_adapter
    from shared.config import ModelConfig
    from shared.sampling import rollout, encode

    adapter = load_adapter(ModelConfig(model_type="tiny"), device=torch.device("cpu"), seed=0)
    cond = encode(adapter, ["a red circle", "a blue square"], [None, None], 1.0, None, 16, None)
    sigmas = adapter.sigmas(10, (16, 16))
    calls = []
    real = adapter.velocity

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    adapter.velocity = counting
    common = dict(resolution=(16, 16), sigmas=sigmas, guidance_scale=1.0, dynamics="Flow-SDE", noise_level=0.7,
                  sde_steps=[2, 3])
    full = rollout(adapter, cond, [1, 2], **common)
    n_full = len(calls)
    fast = rollout(adapter, cond, [1, 2], tail_solver="dpm_solver++", tail_ratio=0.6, **common)
    assert n_full == 10 and len(calls) - n_full == 4 + 3
    for name in ("latents", "next_latents", "log_probs", "stds"):
        assert torch.equal(getattr(fast, name), getattr(full, name)), name
    assert torch.equal(fast.sigmas[:5], full.sigmas[:5]) and fast.sigmas.shape[0] == 4 + 3 + 1
    assert fast.sde_steps == full.sde_steps == [2, 3]
    assert 0 < (fast.final_latents - full.final_latents).abs().max() < (full.final_latents.abs().max())
    same = rollout(adapter, cond, [1, 2], tail_solver="euler", tail_ratio=1.0, **common)
    assert torch.equal(same.final_latents, full.final_latents)
    with pytest.raises(ValueError, match="tail_solver 'rk4'"):
        rollout(adapter, cond, [1, 2], tail_solver="rk4", **common)
