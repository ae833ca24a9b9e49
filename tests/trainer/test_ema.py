"""EMA decay schedules (closed forms) and the shadow-weight arithmetic."""

import math

import pytest
import torch

from trainer.ema import EMA, SCHEDULES, ema_decay


@pytest.mark.parametrize(
    "schedule, step, kwargs, expected",
    [
        ("constant", 0, {}, 0.9),
        ("constant", 500, {}, 0.9),
        # power: min(d, (1+k)/(W+k)), W = 10
        ("power", 0, {}, 1 / 10),
        ("power", 5, {}, 6 / 15),
        ("power", 80, {}, 0.9),  # 81/90 = 0.9 exactly
        ("power", 1000, {}, 0.9),  # capped at d
        ("power", 3, {"warmup_steps": 1}, 0.9),  # 4/4 = 1 -> capped
        # linear: d0 + (d - d0) * min(k/W, 1)
        ("linear", 0, {"initial_decay": 0.5}, 0.5),
        ("linear", 5, {"initial_decay": 0.5}, 0.5 + 0.4 * 0.5),
        ("linear", 50, {"initial_decay": 0.5}, 0.9),
        ("linear", 3, {"warmup_steps": 0}, 0.9),  # zero-length ramp = done
        # piecewise_linear: 0 if k < flat else min((k - flat) * rate, d)
        ("piecewise_linear", 4, {"flat_steps": 5}, 0.0),
        ("piecewise_linear", 5, {"flat_steps": 5}, 0.0),
        ("piecewise_linear", 105, {"flat_steps": 5, "ramp_rate": 0.001}, 0.1),
        ("piecewise_linear", 10_000, {"flat_steps": 5}, 0.9),
        # cosine: d0 + (d - d0) * (1 - cos(pi * min(k/T, 1))) / 2, T = 1000
        ("cosine", 0, {"initial_decay": 0.1}, 0.1),
        ("cosine", 500, {"initial_decay": 0.1}, 0.5),
        ("cosine", 250, {}, 0.9 * (1 - math.cos(math.pi / 4)) / 2),
        ("cosine", 5000, {"initial_decay": 0.1}, 0.9),
        # warmup_cosine: d0 * k / W for k < W, then cosine d0 -> d over T - W
        ("warmup_cosine", 0, {"initial_decay": 0.5}, 0.0),
        ("warmup_cosine", 5, {"initial_decay": 0.5}, 0.25),
        ("warmup_cosine", 10, {"initial_decay": 0.5}, 0.5),
        ("warmup_cosine", 505, {"initial_decay": 0.5}, 0.7),  # halfway through the 990-step cosine
        ("warmup_cosine", 1000, {"initial_decay": 0.5}, 0.9),
        ("warmup_cosine", 2000, {"initial_decay": 0.5}, 0.9),
    ],
)
def test_schedule_closed_forms(schedule, step, kwargs, expected):
    assert ema_decay(step, schedule, 0.9, **kwargs) == pytest.approx(expected, abs=1e-12)


def test_unknown_schedule_lists_choices():
    with pytest.raises(ValueError) as e:
        ema_decay(0, "exponential", 0.9)
    for name in SCHEDULES:
        assert name in str(e.value)


@pytest.mark.parametrize("bad", [{"step": -1}, {"decay": 1.5}])
def test_invalid_arguments(bad):
    args = {"step": 0, "schedule": "constant", "decay": 0.9} | bad
    with pytest.raises(ValueError):
        ema_decay(args["step"], args["schedule"], args["decay"])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_stay_in_range(schedule):
    for k in range(0, 1200, 7):
        assert 0.0 <= ema_decay(k, schedule, 0.99, initial_decay=0.3) <= 0.99 + 1e-12


def _params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g).to(dtype).requires_grad_(),
        "b": torch.randn(4, generator=g).to(dtype).requires_grad_(),
    }


def test_shadow_is_float32_copy():
    params = _params(torch.bfloat16)
    ema = EMA(params, device="cpu")
    for n, p in params.items():
        assert ema.shadow[n].dtype == torch.float32
        assert not ema.shadow[n].requires_grad
        assert torch.equal(ema.shadow[n], p.detach().float())
        assert ema.shadow[n].data_ptr() != p.data_ptr()


def test_update_arithmetic():
    params = _params()
    ema = EMA(params)
    start = {n: p.detach().clone() for n, p in params.items()}
    new = {n: p.detach() + 1.0 for n, p in params.items()}
    ema.update(new, 0.75)
    for n in params:
        assert torch.allclose(ema.shadow[n], 0.75 * start[n] + 0.25 * new[n])
    newer = {n: p * 3.0 for n, p in new.items()}
    ema.update(newer, 0.5)
    for n in params:
        expected = 0.5 * (0.75 * start[n] + 0.25 * new[n]) + 0.5 * newer[n]
        assert torch.allclose(ema.shadow[n], expected)


def test_update_does_not_track_grad():
    params = _params()
    ema = EMA(params)
    ema.update(params, 0.9)
    assert all(not s.requires_grad and s.grad_fn is None for s in ema.shadow.values())


def test_decay_zero_copies_and_one_freezes():
    params = _params()
    ema = EMA(params)
    frozen = ema.state_dict()
    moved = {n: p.detach() * -2.0 + 5.0 for n, p in params.items()}
    ema.update(moved, 1.0)
    for n in params:
        assert torch.equal(ema.shadow[n], frozen[n])
    ema.update(moved, 0.0)
    for n in params:
        assert torch.equal(ema.shadow[n], moved[n])


def test_copy_to_state_dict_roundtrip_and_as_params():
    params = _params(torch.bfloat16)
    ema = EMA(params)
    ema.update({n: torch.ones_like(p) for n, p in params.items()}, 0.0)

    state = ema.state_dict()
    other = EMA(_params())
    other.load_state_dict(state)
    for n in params:
        assert torch.equal(other.shadow[n], state[n])
    state["w"].zero_()  # state_dict returns copies
    assert torch.equal(ema.shadow["w"], torch.ones(3, 4))

    cast = ema.as_params(params)
    assert set(cast) == set(params)
    for n, p in params.items():
        assert cast[n].dtype == torch.bfloat16 and cast[n].device == p.device
        assert torch.equal(cast[n], torch.ones_like(p))

    with torch.no_grad():
        ema.copy_to(params)
    for p in params.values():
        assert p.dtype == torch.bfloat16 and torch.equal(p, torch.ones_like(p))


def test_as_params_with_functional_call():
    lin = torch.nn.Linear(4, 2)
    named = dict(lin.named_parameters())
    ema = EMA(named)
    ema.update({n: torch.zeros_like(p) for n, p in named.items()}, 0.0)
    out = torch.func.functional_call(lin, ema.as_params(named), (torch.randn(3, 4),))
    assert torch.equal(out, torch.zeros(3, 2))
    assert not torch.equal(lin.weight, torch.zeros_like(lin.weight))  # live weights untouched


def test_name_mismatch_raises():
    ema = EMA(_params())
    with pytest.raises(KeyError, match="Missing"):
        ema.update({"w": torch.zeros(3, 4)}, 0.5)
    with pytest.raises(KeyError):
        ema.as_params({"w": torch.zeros(3, 4)})


def _ema_updates(monkeypatch) -> list[int]:
    """The optimizer step of every EMA update a run applies."""
    from trainer.policy import Policy

    steps: list[int] = []
    real = EMA.update

    def update(self, *args, **kwargs):
        steps.append(policy_step[0])
        return real(self, *args, **kwargs)

    policy_step = [0]
    real_update_ema = Policy.update_ema

    def update_ema(self, optimizer_step, **kwargs):
        policy_step[0] = optimizer_step
        return real_update_ema(self, optimizer_step, **kwargs)

    monkeypatch.setattr(EMA, "update", update)
    monkeypatch.setattr(Policy, "update_ema", update_ema)
    return steps


def test_an_ema_that_drew_the_samples_holds_still_until_their_epoch_is_trained(tmp_path, monkeypatch):
    """nft samples from its EMA and takes v_old from it: with 2 optimizer steps an epoch the second step's
    v_old was the EMA already moved by the first (about the current weights early on), not the policy that
    drew the samples. It now moves once an epoch, at its end (DiffusionNFT's old model, once an iteration);
    grpo's EMA (eval weights only) still moves after every step."""
    from tests.helpers.tiny import tiny_config
    from trainer.algorithms.nft import NFT
    from trainer.loop import train

    v_old_from: list[float] = []
    real_prepare = NFT.prepare

    def prepare(self, batch, policy):
        v_old_from.append(sum(float(s.double().sum()) for s in policy.ema.shadow.values()))
        return real_prepare(self, batch, policy)

    monkeypatch.setattr(NFT, "prepare", prepare)
    steps = _ema_updates(monkeypatch)
    train(tiny_config(tmp_path / "nft", "nft", ["train.max_epochs=3"]), quiet=True)
    assert steps == [2, 4, 6]  # 2 optimizer steps an epoch, one update at each epoch's end
    assert len(v_old_from) == 6 and all(v_old_from[i] == v_old_from[i + 1] for i in (0, 2, 4))
    assert len(set(v_old_from[::2])) == 3  # and it does move from epoch to epoch
    steps.clear()
    train(tiny_config(tmp_path / "grpo", "grpo", ["train.max_epochs=2"]), quiet=True)
    assert steps == [1, 2, 3, 4]


def test_held_ema_updates_follow_the_interval():
    """``since``: one update when the held steps passed a multiple of ema_update_interval."""
    from types import SimpleNamespace

    from trainer.policy import Policy

    calls = []
    fake = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(
        ema_update_interval=3, ema_decay_schedule="constant", ema_decay=0.5, initial_decay=0.0,
        ema_warmup_steps=0, total_steps=0, flat_steps=0, ramp_rate=0.0)),
        ema=SimpleNamespace(update=lambda pieces, decay: calls.append(decay)), _pieces=lambda: None)
    assert [Policy.update_ema(fake, end, since=start) is not None
            for start, end in ((0, 2), (2, 4), (4, 5), (5, 6), (6, 12))] == [False, True, False, True, True]
    assert len(calls) == 3
