"""``model.activation_offload`` (trainer/offload.py): what a training forward saves for backward waits in
host memory. Checks: the round trip leaves gradients exact; parameters, small tensors and (but for the
test switch) CPU tensors stay; a run trains the same weights with it on; on a GPU (device machine) the
peak memory of a checkpointed forward + backward falls and the gradients are the same."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from trainer.offload import OffloadActivations


def blocks(width: int = 64, depth: int = 4, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                                     torch.nn.Linear(4 * width, width)) for _ in range(depth)])


def grads(model, x, offload=None) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if offload is None:
        (model(x) ** 2).mean().backward()
    else:
        with offload:
            y = model(x)
        (y ** 2).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_round_trip_gives_the_same_gradients():
    model, x = blocks(), torch.randn(32, 64)
    offload = OffloadActivations(min_bytes=0, include_cpu=True)
    for a, b in zip(grads(model, x), grads(model, x, offload)):
        assert torch.equal(a, b)
    assert offload.counts["tensors"] >= 8  # every Linear's input, every GELU's (and the rest) went


def test_under_checkpointing_each_blocks_input_goes():
    from torch.utils.checkpoint import checkpoint

    model, x = blocks(), torch.randn(32, 64)

    def forward():
        y = x
        for block in model:
            y = checkpoint(block, y, use_reentrant=False)  # as diffusers checkpoints its blocks
        return y

    model.zero_grad(set_to_none=True)
    (forward() ** 2).mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    offload = OffloadActivations(min_bytes=0, include_cpu=True)
    with offload:
        y = forward()
    (y ** 2).mean().backward()
    for a, b in zip(plain, [p.grad for p in model.parameters()]):
        assert torch.equal(a, b)
    # blocks 1-3's inputs (the checkpoints save them as saved tensors); block 0's is data, not an activation
    assert offload.counts == {"tensors": 3, "bytes": 3 * 32 * 64 * 4}


def test_parameters_small_and_cpu_tensors_stay():
    layer = torch.nn.Linear(64, 64)
    x = torch.randn(16, 64, requires_grad=True)  # so the weight is saved too (for x's gradient)
    offload = OffloadActivations(min_bytes=0, include_cpu=True)
    with offload:
        layer(x).sum().backward()
    assert offload.counts == {"tensors": 1, "bytes": x.numel() * 4}  # x only: never the weight

    small = OffloadActivations(min_bytes=x.numel() * 4 + 1, include_cpu=True)
    with small:
        layer(x).sum().backward()
    assert small.counts["tensors"] == 0

    cpu = OffloadActivations(min_bytes=0)  # a CPU tensor is where it would go already
    with cpu:
        layer(x).sum().backward()
    assert cpu.counts["tensors"] == 0


def test_a_run_with_it_trains_the_same_weights(tmp_path):
    from tests.helpers.tiny import tiny_config
    from trainer.loop import train

    runs = {}
    for name, flags in (("plain", []), ("offload", ["model.activation_offload=true"])):
        cfg = tiny_config(tmp_path, "grpo", ["train.max_epochs=1", f"run_name={name}", *flags])
        train(cfg, quiet=True)
        logged = (tmp_path / "runs" / name / "metrics.jsonl").read_text()
        assert ("train/offloaded_mib" in logged) == bool(flags)  # 0 here: a CPU run's tensors are already home
        runs[name] = load_file(tmp_path / "runs" / name / "checkpoints" / "final" / "lora" /
                               "pytorch_lora_weights.safetensors")
    assert runs["plain"].keys() == runs["offload"].keys()
    for k in runs["plain"]:
        assert torch.equal(runs["plain"][k], runs["offload"][k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_the_peak_falls_and_the_gradients_stay():
    from torch.utils.checkpoint import checkpoint

    model, x = blocks(width=1024, depth=8).cuda(), torch.randn(8192, 1024, device="cuda")

    def step(offload):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with offload:
            y = x
            for block in model:
                y = checkpoint(block, y, use_reentrant=False)
        (y.float() ** 2).mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, [p.grad.clone() for p in model.parameters()]

    import contextlib

    plain_peak, plain = step(contextlib.nullcontext())
    offload = OffloadActivations()
    off_peak, moved = step(offload)
    assert offload.counts["tensors"] == 7  # each block's input but the first's (x: data, not an activation)
    for a, b in zip(plain, moved):
        assert torch.equal(a, b)
    assert off_peak < plain_peak - 4 * 8192 * 1024 * 4, (off_peak, plain_peak)  # at least 4 block inputs fewer


def test_weights_and_their_casts_are_not_activations():
    from trainer.offload import is_weight

    w = torch.nn.Parameter(torch.randn(8, 8))
    frozen = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
    x = torch.randn(4, 8)
    h = x @ w  # an activation
    assert is_weight(w) and is_weight(w.t()) and is_weight(frozen.t())
    assert is_weight(w.to(torch.bfloat16))  # autocast's copy of a trained weight
    assert is_weight(frozen.to(torch.bfloat16)) and is_weight(x)  # leaves outside autograd
    assert not is_weight(h) and not is_weight(h.t()) and not is_weight(h.to(torch.bfloat16))
