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


def test_average_of_two_checkpoints_loads_as_their_mean(tmp_path):
    cfg = tiny_config(tmp_path, "nft", ["train.max_epochs=2", "train.save_freq=1"])
    train(cfg, quiet=True)
    ckpts = tmp_path / "runs" / "tiny_nft" / "checkpoints"
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
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    load_checkpoint_weights(out, cfg, adapter, policy)
    params = dict(adapter.transformer.named_parameters())
    key = next(k for k in m if "lora_A" in k)
    name = next(n for n in params if n.endswith(key.removeprefix("transformer.").replace(".weight", ".default.weight")))
    torch.testing.assert_close(params[name].detach(), m[key])
    assert all(torch.equal(v, em[k]) for k, v in policy.ema.shadow.items())

    with pytest.raises(ValueError, match="at least two"):
        avg.average_checkpoints([final], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a flowrl checkpoint"):
        avg.average_checkpoints([final, tmp_path], tmp_path / "x")
