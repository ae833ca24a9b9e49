"""``train.ptx_coef``: the pretraining-data mix (trainer/ptx.py) — the flow-matching loss on
(caption, image) pairs added to the RL loss, on the shipped toy SD3 pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.config import ConfigError, apply_overrides, parse_config
from shared.models import load_adapter
from shared.toy.scenes import parse_prompt, write_pretraining_set
from tests.helpers.tiny import tiny_config, tiny_raw
from trainer.data import DatasetError
from trainer.policy import Policy, attach_trainable
from trainer.ptx import PretrainMix, flow_matching_loss, logit_normal_sigmas

ROOT = Path(__file__).parents[2]


def toy_config(tmp_path: Path, overrides: list[str]):
    raw = tiny_raw(tmp_path, "nft")
    raw["model"] = {"model_type": "sd3-5", "model_name_or_path": str(ROOT / "assets" / "toy-sd3"),
                    "finetune_type": "lora", "lora_rank": 4}
    raw["train"].update(resolution=64, num_inference_steps=3, group_size=2, unique_sample_num_per_epoch=2,
                        per_device_batch_size=4, gradient_step_per_epoch=1, max_epochs=1)
    raw["eval"].update(num_inference_steps=2, num_prompts=2)
    return parse_config(apply_overrides(raw, overrides))


def test_flow_matching_loss_and_sigmas_closed_forms():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert flow_matching_loss(eps - x0, x0, eps) == 0
    v = torch.zeros_like(x0)
    torch.testing.assert_close(flow_matching_loss(v, x0, eps), ((eps - x0) ** 2).mean())
    s = logit_normal_sigmas(20000, torch.Generator().manual_seed(0))
    assert s.shape == (20000,) and float(s.min()) >= 1e-3 and float(s.max()) <= 1 - 1e-3
    assert abs(float(s.median()) - 0.5) < 0.02  # sigmoid(N(0, 1)) has median 1/2
    shifted = logit_normal_sigmas(20000, torch.Generator().manual_seed(0), mean=1.0)
    assert abs(float(shifted.median()) - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02


def test_pretraining_set_is_train_split_pairs(tmp_path):
    from shared.toy.scenes import split
    from shared.toy.verify import verify

    write_pretraining_set(tmp_path / "ptx", 12, seed=2)
    rows = [json.loads(x) for x in (tmp_path / "ptx" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    train_prompts = {s for s in split()[0]}
    from PIL import Image
    import numpy as np

    for row in rows:
        assert parse_prompt(row["prompt"]) in train_prompts  # never a held-out combination
        image = np.asarray(Image.open(tmp_path / "ptx" / "images" / row["image"]))
        assert image.shape == (64, 64, 3) and verify(image, row["prompt"]).correct


def test_ptx_needs_a_dataset_and_one_image_per_row(tmp_path):
    with pytest.raises(ConfigError, match="ptx_dataset"):
        tiny_config(tmp_path, "nft", ["train.ptx_coef=1.0"])
    folder = tmp_path / "bad"
    write_pretraining_set(folder, 3)
    # the tiny test model has no VAE to encode targets with: a clear error at start, not mid-epoch
    cfg = tiny_config(tmp_path, "nft", ["train.ptx_coef=1.0", f"train.ptx_dataset={folder}"])
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    with pytest.raises(NotImplementedError, match="ptx_coef: 0"):
        PretrainMix(cfg, adapter)

    lines = (folder / "train.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"prompt": "a photo of a circle"})  # no target image
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = toy_config(tmp_path, ["train.ptx_coef=1.0", f"train.ptx_dataset={folder}"])
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    with pytest.raises(DatasetError, match=r"train\.jsonl:2.*exactly one"):
        PretrainMix(cfg, adapter)
    with pytest.raises(DatasetError, match="no train.jsonl"):
        PretrainMix(toy_config(tmp_path, ["train.ptx_coef=1.0", f"train.ptx_dataset={tmp_path / 'none'}"]), adapter)


def test_ptx_loss_trains_the_lora_toward_the_pairs(tmp_path):
    write_pretraining_set(tmp_path / "ptx", 8)
    cfg = toy_config(tmp_path, ["train.ptx_coef=2.0", f"train.ptx_dataset={tmp_path / 'ptx'}",
                                "train.ptx_batch_size=8"])
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    trainable = attach_trainable(adapter, cfg)
    policy = Policy(adapter, adapter.transformer, cfg, trainable)
    mix = PretrainMix(cfg, adapter)
    assert len(mix) == 8 and mix.latents.shape[0] == 8
    torch.testing.assert_close(mix.loss(policy, 5), mix.loss(policy, 5))  # seeded
    frozen = {n: p.detach().clone() for n, p in adapter.transformer.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam(list(trainable.values()), lr=3e-3)
    with torch.no_grad():
        before = float(mix.loss(policy, 5))
    for step in range(30):
        opt.zero_grad()
        mix.loss(policy, step).backward()
        opt.step()
    with torch.no_grad():
        after = float(mix.loss(policy, 5))
    assert after < before  # it fits the eight pairs
    assert all(torch.equal(p, frozen[n]) for n, p in adapter.transformer.named_parameters() if n in frozen)
    # the loss is the plain flow-matching loss: ptx_coef weights it in the training loop
    half = PretrainMix(toy_config(tmp_path, ["train.ptx_coef=1.0", f"train.ptx_dataset={tmp_path / 'ptx'}",
                                             "train.ptx_batch_size=8"]), adapter)
    torch.testing.assert_close(half.loss(policy, 5), mix.loss(policy, 5))


def test_training_with_ptx_logs_its_loss_and_weights_it_by_the_coefficient(tmp_path):
    from trainer.loop import train

    write_pretraining_set(tmp_path / "ptx", 6)
    logged = {}
    for coef in (1.0, 3.0):
        cfg = toy_config(tmp_path, [f"train.ptx_coef={coef}", f"train.ptx_dataset={tmp_path / 'ptx'}",
                                    "train.ptx_batch_size=4", f"run_name=ptx{coef:g}"])
        train(cfg, quiet=True)
        rows = [json.loads(x) for x in (tmp_path / "runs" / f"ptx{coef:g}" / "metrics.jsonl").read_text().splitlines()]
        logged[coef] = [r for r in rows if "train/ptx_loss" in r]
        assert len(logged[coef]) == 1 and 0 < logged[coef][0]["train/ptx_loss"] < 10
    one, three = logged[1.0][0], logged[3.0][0]
    # the same rollouts and pairs before the first update: the same unweighted ptx loss ...
    assert one["train/ptx_loss"] == pytest.approx(three["train/ptx_loss"], rel=1e-6)
    # ... and the training loss carries coef x it (ptx rides on one of the micro-batch's units)
    from trainer.algorithms import ALGORITHMS
    units = ALGORITHMS.get("nft")(cfg).num_units(0)
    assert three["train/loss"] - one["train/loss"] == pytest.approx(2 * one["train/ptx_loss"] / units, rel=1e-4)
