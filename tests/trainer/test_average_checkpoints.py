"""``scripts/average_checkpoints.py``: the tensor-wise mean of a LoRA run's checkpoints, written as a
checkpoint that ``flowrl eval`` (``load_checkpoint_weights``) loads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shared.models import load_adapter
from tests.helpers.tiny import tiny_config
from trainer.checkpoint import load_checkpoint_weights
from trainer.loop import train
from trainer.policy import Policy, attach_trainable

ROOT = Path(__file__).parents[2]
_spec = importlib.util.spec_from_file_location("average_checkpoints", ROOT / "scripts" / "average_checkpoints.py")
avg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(avg)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch tiny NFT run saved after each epoch: (config, checkpoints folder)."""
    root = tmp_path_factory.mktemp("avg_run")
    cfg = tiny_config(root, "nft", ["train.max_epochs=2", "train.save_freq=1"])
    train(cfg, quiet=True)
    return cfg, root / "runs" / "tiny_nft" / "checkpoints"


def _loaded(cfg, checkpoint):
    """The adapter and policy as ``flowrl eval`` loads ``checkpoint``."""
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    load_checkpoint_weights(checkpoint, cfg, adapter, policy)
    return adapter, policy


def test_average_of_two_checkpoints_loads_as_their_mean(run, tmp_path):
    cfg, ckpts = run
    first, final = ckpts / "checkpoint-1", ckpts / "final"
    out = avg.average_checkpoints([first, final], tmp_path / "avg")
    assert not (out / "resume").exists() and (out / "trainer_state.json").is_file()

    rel = "lora/pytorch_lora_weights.safetensors"
    a, b, m = (load_file(str(p / rel)) for p in (first, final, out))
    assert set(m) == set(a) and any(not torch.equal(a[k], b[k]) for k in a)  # training moved them
    for k in m:
        torch.testing.assert_close(m[k], (a[k].float() + b[k].float()) / 2)
    with safe_open(str(final / rel), "pt") as f1, safe_open(str(out / rel), "pt") as f2:
        assert f2.metadata() == f1.metadata()  # the LoRA config diffusers reads
    ea, eb, em = (load_file(str(p / "ema.safetensors")) for p in (first, final, out))
    for k in em:
        torch.testing.assert_close(em[k], (ea[k] + eb[k]) / 2)

    # flowrl eval's loader reads it: the model carries the averaged LoRA and EMA
    adapter, policy = _loaded(cfg, out)
    params = dict(adapter.transformer.named_parameters())
    key = next(k for k in m if "lora_A" in k)
    name = next(n for n in params if n.endswith(key.removeprefix("transformer.").replace(".weight", ".default.weight")))
    torch.testing.assert_close(params[name].detach(), m[key])
    assert all(torch.equal(v, em[k]) for k, v in policy.ema.shadow.items())

    with pytest.raises(ValueError, match="at least two"):
        avg.average_checkpoints([final], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a flowrl checkpoint"):
        avg.average_checkpoints([final, tmp_path], tmp_path / "x")


def test_scale_multiplies_each_lora_update(run, tmp_path):
    """``--scale``: lora_B (LoRA file and EMA) times S, lora_A unchanged; S = 0 gives the base
    model's velocity, S = 2 moves the velocity further from the base than the checkpoint does."""
    cfg, ckpts = run
    final = ckpts / "final"
    rel = "lora/pytorch_lora_weights.safetensors"
    twice = avg.average_checkpoints([final], tmp_path / "x2", scale=2.0)
    for f in (rel, "ema.safetensors"):
        a, b = load_file(str(final / f)), load_file(str(twice / f))
        assert any(".lora_B." in k for k in a) and any(".lora_A." in k for k in a)
        for k in a:
            torch.testing.assert_close(b[k], a[k].float() * (2.0 if ".lora_B." in k else 1.0))

    sigma = torch.tensor([0.7, 0.3])

    def velocities(checkpoint):
        adapter, policy = _loaded(cfg, checkpoint)
        shape = adapter.latent_shape((cfg.train.resolution, cfg.train.resolution))
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
        cond = adapter.encode_prompts(["a red circle", "two squares"], cfg=False)
        with torch.no_grad():
            v = adapter.velocity(x, sigma, cond, 1.0, transformer=policy.eval_module())
            adapter.transformer.disable_adapters()
            base = adapter.velocity(x, sigma, cond, 1.0)
        return v, base

    v1, base = velocities(final)
    v0, _ = velocities(avg.average_checkpoints([final], tmp_path / "x0", scale=0.0))
    v2, _ = velocities(twice)
    torch.testing.assert_close(v0, base)
    assert (v1 - base).norm() > 1e-4  # training moved the model
    assert (v2 - base).norm() > 1.5 * (v1 - base).norm()
