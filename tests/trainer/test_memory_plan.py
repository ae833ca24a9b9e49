"""``flowrl check CONFIG --memory`` (``trainer/memory.py``) and ``bench/memory_plan.py``: the persistent
memory per process by arithmetic, against closed forms and against what a loaded model and an
AdamW step really hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.models import load_adapter
from tests.helpers.tiny_pipelines import TINY_PIPELINES, tiny_train_config
from trainer.memory import ParamCounts, count_params, memory_report, meta_transformer, plan_bytes

ROOT = Path(__file__).resolve().parents[2]


def test_the_plan_adds_up_and_fsdp_divides_it():
    counts = ParamCounts(frozen=1000, trained=100, largest_block=300)
    ddp = plan_bytes(counts, world_size=4, fsdp=False, frozen_dtype="bfloat16", master_dtype="float32",
                     ema=True, ema_on_gpu=True, ref_copy=False, ref_on_gpu=True)
    assert ddp == {"frozen_weights": 2000, "trained_weights": 400, "gradients": 400, "adam_moments": 800,
                   "ema": 400, "snapshots": 0, "kl_reference": 0, "gathered_block": 0, "total": 4000}
    fsdp = plan_bytes(counts, world_size=4, fsdp=True, frozen_dtype="bfloat16", master_dtype="float32",
                      ema=True, ema_on_gpu=False, ref_copy=True, ref_on_gpu=True, snapshots=2)
    assert fsdp == {"frozen_weights": 500, "trained_weights": 100, "gradients": 100, "adam_moments": 200,
                    "ema": 0, "snapshots": 200, "kl_reference": 1100, "gathered_block": 1200, "total": 3400}
    cpu = plan_bytes(counts, world_size=4, fsdp=True, frozen_dtype="bfloat16", master_dtype="float32",
                     ema=True, ema_on_gpu=False, ref_copy=True, ref_on_gpu=False, snapshots=2, snapshots_on_gpu=False)
    assert cpu["snapshots"] == cpu["kl_reference"] == 0


@pytest.mark.parametrize("finetune_type", ["lora", "full"])
def test_the_plan_matches_a_loaded_model_and_an_adamw_step(tmp_path, finetune_type):
    from trainer.loop import build_optimizer
    from trainer.policy import attach_trainable

    spec = TINY_PIPELINES["flux1"]
    cfg = tiny_train_config(spec, spec.save(tmp_path / "pipe"), tmp_path,
                            model={"finetune_type": finetune_type,
                                   "options": {**spec.options, "transformer_dtype": "bfloat16"}},
                            train={"ema_decay": 0.9})
    report = memory_report(cfg, world_size=1)
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    trainable = attach_trainable(adapter, cfg)
    real = count_params(adapter.transformer)
    assert report["params"] == {"frozen": real.frozen, "trained": real.trained, "largest_block": real.largest_block}

    optimizer, _ = build_optimizer(cfg, trainable)
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moments = sum(v.numel() * v.element_size() for st in optimizer.state.values() for k, v in st.items()
                  if k != "step")
    weights = sum(p.numel() * p.element_size() for p in adapter.transformer.parameters())
    plan = plan_bytes(count_params(meta_transformer(cfg.model)), world_size=1, fsdp=False,
                      frozen_dtype="bfloat16", master_dtype="float32", ema=True, ema_on_gpu=True,
                      ref_copy=False, ref_on_gpu=True)
    assert plan["adam_moments"] == moments
    # bf16 frozen weights, float32 trained ones; the model's own float32 modules make the real
    # frozen bytes a little larger than the plan's bf16 arithmetic
    assert plan["frozen_weights"] + plan["trained_weights"] <= weights <= 1.05 * (plan["frozen_weights"] + plan["trained_weights"])


def test_check_prints_the_memory_plan(tmp_path, capsys):
    import yaml

    from trainer.cli import main

    spec = TINY_PIPELINES["sd3-5"]
    cfg = tiny_train_config(spec, spec.save(tmp_path / "pipe"), tmp_path, train={"fsdp": True, "per_device_batch_size": 2})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    assert main(["check", str(path), "--world-size", "2", "--memory"]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[out.rindex('{\n  "world_size"'):])
    assert plan["world_size"] == 2 and plan["fsdp"] and plan["gib_per_process"]["total"] >= 0
    assert plan["params"]["trained"] > 0 and plan["params"]["frozen"] > plan["params"]["trained"]
    # hybrid sharding splits within a shard group only: 4 processes in groups of 2 hold what 2 do
    from shared.config import load_config
    from trainer.memory import memory_report

    two = memory_report(load_config(path), 2)["bytes_per_process"]
    assert two["frozen_weights"] > 0
    assert memory_report(load_config(path, ["train.fsdp_shard_size=2"]), 4)["bytes_per_process"] == two
    assert memory_report(load_config(path), 4)["bytes_per_process"]["frozen_weights"] == two["frozen_weights"] // 2

    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({"model": {"model_type": "tiny"}, "rewards": [{"reward_model": "brightness"}]}))
    assert main(["check", str(tiny), "--memory"]) == 2
    assert "model.model_name_or_path" in capsys.readouterr().err


def test_the_recipes_plan_on_the_real_architectures(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "bench/memory_plan.py", "--out", str(out), "--no-doc"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["recipe"]: r for r in json.loads(out.read_text())}
    assert len(rows) == len([*(ROOT / "examples").glob("*/lora/*.yaml"), *(ROOT / "examples").glob("*/full/*.yaml")])
    a14b = rows["grpo/lora/wan2_t2v-a14b.yaml"]["params"]
    assert 28e9 < a14b["frozen"] + a14b["trained"] < 30e9  # two 14B experts
    flux = rows["grpo/full/flux1.yaml"]
    assert 11.5e9 < flux["params"]["trained"] < 12.5e9 and flux["fsdp"]
    assert flux["gib_per_process"]["gathered_block"] > 0
    # 16 bytes a trained parameter (weights, gradients, AdamW), over 8 GPUs
    optim = sum(flux["gib_per_process"][k] for k in ("trained_weights", "gradients", "adam_moments"))
    assert abs(optim - 16 * flux["params"]["trained"] / 8 / 2**30) < 0.05


def test_the_plan_counts_crds_two_snapshots(tmp_path):
    spec = TINY_PIPELINES["sd3-5"]
    pipe = spec.save(tmp_path / "pipe")
    plans = {kind: memory_report(tiny_train_config(spec, pipe, tmp_path, train={"trainer_type": kind}), world_size=1)
             for kind in ("nft", "crd")}
    trained = plans["crd"]["params"]["trained"]
    assert plans["crd"]["bytes_per_process"]["snapshots"] == 2 * 4 * trained
    assert plans["nft"]["bytes_per_process"]["snapshots"] == 0
