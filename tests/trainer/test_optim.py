"""``train.optimizer: muon``: torch's Muon on the 2-D matrices and AdamW on the rest, as one
optimizer (trainer/optim.py): each part steps exactly as its torch optimizer alone would, an LR
schedule reaches both, the state round-trips through the resume format, and the config refuses
muon under FSDP. (A bit-identical resumed muon run is in test_resume.py.)"""

from __future__ import annotations

import pytest
import torch

from trainer.optim import MuonWithAdamW, build
from trainer.resume import load_optimizer, optimizer_tensors

KW = dict(lr=0.01, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)


def params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 4), (3,), (16, 8), (2, 3, 3, 3)]  # two matrices, a bias, a conv kernel
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def set_grads(ps, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def test_each_part_steps_exactly_as_its_torch_optimizer_alone():
    ours, ref = params(), params()
    opt = MuonWithAdamW(ours, momentum=0.9, nesterov=True, ns_steps=5, adjust_lr_fn="match_rms_adamw", **KW)
    muon = torch.optim.Muon([ref[0], ref[2]], lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=True, ns_steps=5,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([ref[1], ref[3]], lr=0.01, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
    for step in range(3):
        set_grads(ours, step)
        set_grads(ref, step)
        opt.step()
        muon.step()
        adamw.step()
        opt.zero_grad()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    assert len(opt.state) == 4 and "momentum_buffer" in opt.state[ours[0]] and "exp_avg" in opt.state[ours[1]]


def test_only_matrices_or_only_others_build_one_part():
    lora = [torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(8, 4))]
    opt = MuonWithAdamW(lora, **KW)
    assert [type(p).__name__ for p in opt.parts] == ["Muon"]
    assert [type(p).__name__ for p in MuonWithAdamW([torch.nn.Parameter(torch.randn(3))], **KW).parts] == ["AdamW"]


def test_an_lr_schedule_reaches_both_parts():
    from diffusers.optimization import get_scheduler

    opt = MuonWithAdamW(params(), **KW)
    schedule = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=4)
    set_grads([p for g in opt.param_groups for p in g["params"]], 0)
    opt.step()
    schedule.step()
    assert [g["lr"] for part in opt.parts for g in part.param_groups] == pytest.approx([0.0075, 0.0075])


def test_the_state_round_trips_through_the_resume_format():
    a, b = params(), params()
    opt_a = MuonWithAdamW(a, **KW)
    for step in range(2):
        set_grads(a, step)
        opt_a.step()
    tensors, rest = optimizer_tensors(opt_a)
    tensors = {k: v.clone() for k, v in tensors.items()}  # as read back from the file (on a CPU they share storage)
    assert {k.split("/")[1] for k in tensors} == {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"}
    with torch.no_grad():
        for x, y in zip(b, a):
            x.copy_(y)
    opt_b = MuonWithAdamW(b, **KW)
    load_optimizer(opt_b, tensors, rest)
    set_grads(a, 2)
    set_grads(b, 2)
    opt_a.step()
    opt_b.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="another optimizer"):
        MuonWithAdamW(params()[:1], **KW).load_state_dict(opt_a.state_dict())


def test_config_picks_the_optimizer_and_refuses_muon_under_fsdp(tmp_path):
    from shared.config import ConfigError
    from tests.helpers.tiny import tiny_config

    assert type(build(tiny_config(tmp_path), params())).__name__ == "AdamW"
    cfg = tiny_config(tmp_path, overrides=["train.optimizer=muon", "train.muon_adjust_lr_fn=original",
                                           "train.muon_ns_steps=3"])
    opt = build(cfg, params())
    assert isinstance(opt, MuonWithAdamW) and opt.parts[0].param_groups[0]["ns_steps"] == 3
    assert opt.parts[0].param_groups[0]["adjust_lr_fn"] == "original"
    with pytest.raises(ConfigError, match="muon orthogonalizes each whole weight matrix"):
        tiny_config(tmp_path, overrides=["train.optimizer=muon", "train.fsdp=true"])


def test_excluded_matrices_and_the_adamw_learning_rate():
    named = [("transformer_blocks.0.attn.to_q.weight", torch.nn.Parameter(torch.randn(8, 8))),
             ("context_embedder.weight", torch.nn.Parameter(torch.randn(8, 4))),
             ("proj_out.weight", torch.nn.Parameter(torch.randn(4, 8))),
             ("norm.bias", torch.nn.Parameter(torch.randn(8)))]
    opt = MuonWithAdamW(named, exclude=("embed", "proj_out"), adamw_lr=1e-4, **KW)
    muon, adamw = opt.parts
    assert [p.shape for p in muon.param_groups[0]["params"]] == [(8, 8)]
    assert len(adamw.param_groups[0]["params"]) == 3
    assert (muon.param_groups[0]["lr"], adamw.param_groups[0]["lr"]) == (0.01, 1e-4)
    with pytest.raises(NotImplementedError, match="build a new one"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))]})
    import copy

    with pytest.raises(TypeError, match="save its state_dict"):
        copy.deepcopy(opt)
