"""``model.init_from``: a run starts from another run's LoRA (into its adapter, or fused into a full
fine-tune) or full weights (under a new LoRA, or trained on), and the first evaluation of a run
warm-started from run A's final weights is A's final evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.models import load_adapter
from tests.helpers.tiny import tiny_config
from trainer.checkpoint import load_checkpoint_weights
from trainer.loop import train
from trainer.policy import attach_trainable
from shared.models.warm_start import WarmStartError, find_source, warm_start

FAST = ["train.num_inference_steps=4", "eval.num_inference_steps=4", "train.group_size=4",
        "train.unique_sample_num_per_epoch=2", "train.per_device_batch_size=8",
        "train.gradient_step_per_epoch=1", "train.clip_range=0.01", "train.ema_decay=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A LoRA run and a full fine-tune of the tiny model, 2 epochs each, EMA off."""
    out = {}
    for kind in ("lora", "full"):
        cfg = tiny_config(tmp_path_factory.mktemp(kind), overrides=FAST + [f"model.finetune_type={kind}"])
        out[kind] = train(cfg, quiet=True)
    return out


def built(cfg):
    """What the trainer builds, with the warm start at its two places."""
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=cfg.train.seed)
    warm_start(cfg.model, adapter, "before")
    trainable = attach_trainable(adapter, cfg)
    warm_start(cfg.model, adapter, "after")
    return adapter, trainable


@torch.no_grad()
def velocity(adapter) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x, sigma = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([0.9, 0.4])
    return adapter.velocity(x, sigma, adapter.encode_prompts(["a red circle", "a blue square"], cfg=False), 1.0)


def test_a_lora_run_continues_another_runs_lora(runs, tmp_path):
    ckpt = Path(runs["lora"]["checkpoint"])
    cfg = tiny_config(tmp_path, overrides=FAST + [f"model.init_from={ckpt}"])
    _, trainable = built(cfg)
    saved = {k.removeprefix("transformer."): v for k, v in load_file(ckpt / "lora" / "pytorch_lora_weights.safetensors").items()}
    loaded = {n.replace(".default.", "."): p for n, p in trainable.items()}
    assert loaded.keys() == saved.keys()
    for k, v in saved.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    # the bare diffusers file (what pipeline.save_lora_weights writes) loads the same way
    cfg_file = tiny_config(tmp_path, overrides=FAST + [f"model.init_from={ckpt / 'lora' / 'pytorch_lora_weights.safetensors'}"])
    _, trainable_file = built(cfg_file)
    for n, p in trainable_file.items():
        torch.testing.assert_close(p, trainable[n], rtol=0, atol=0)


def test_a_full_run_starts_from_the_base_with_a_lora_fused_in(runs, tmp_path):
    ckpt = Path(runs["lora"]["checkpoint"])
    lora_cfg = tiny_config(tmp_path / "l", overrides=FAST)
    with_lora, _ = built(lora_cfg)
    load_checkpoint_weights(ckpt, lora_cfg, with_lora, None)  # base + the LoRA, unfused
    full_cfg = tiny_config(tmp_path / "f", overrides=FAST + ["model.finetune_type=full", f"model.init_from={ckpt}"])
    fused, trainable = built(full_cfg)
    assert not any("lora" in n for n in trainable)  # plain weights, all of them trained
    torch.testing.assert_close(velocity(fused), velocity(with_lora), rtol=1e-5, atol=1e-5)
    base = load_adapter(full_cfg.model, device=torch.device("cpu"), seed=full_cfg.train.seed)
    assert not torch.allclose(velocity(fused), velocity(base), atol=1e-4)  # the fused LoRA moved it


def test_a_lora_run_trains_on_top_of_full_weights(runs, tmp_path):
    from diffusers import SD3Transformer2DModel

    ckpt = Path(runs["full"]["checkpoint"])
    cfg = tiny_config(tmp_path, overrides=FAST + [f"model.init_from={ckpt}"])
    adapter, trainable = built(cfg)
    assert trainable and all("lora" in n for n in trainable)
    saved = SD3Transformer2DModel.from_pretrained(ckpt / "transformer")
    adapter.transformer.disable_adapters()  # the frozen base (the KL reference) is the warm start
    base_params = {n.replace(".base_layer", ""): p for n, p in adapter.transformer.named_parameters() if "lora" not in n}
    for n, p in saved.named_parameters():
        torch.testing.assert_close(base_params[n], p, rtol=0, atol=0)
    # the same folder as a plain transformer folder (no trainer_state.json) loads the same way
    cfg2 = tiny_config(tmp_path / "t", overrides=FAST + [f"model.init_from={ckpt / 'transformer'}"])
    adapter2, _ = built(cfg2)
    adapter2.transformer.disable_adapters()
    torch.testing.assert_close(velocity(adapter2), velocity(adapter), rtol=0, atol=0)


def test_the_first_evaluation_of_a_warm_started_run_is_the_source_runs_last(runs, tmp_path):
    source = runs["lora"]
    cfg = tiny_config(tmp_path, overrides=FAST + ["train.max_epochs=1", f"model.init_from={source['checkpoint']}"])
    warm = train(cfg, quiet=True)
    assert warm["base/brightness"] == source["final/brightness"]
    cold = train(tiny_config(tmp_path / "cold", overrides=FAST + ["train.max_epochs=1"]), quiet=True)
    assert cold["base/brightness"] == source["base/brightness"] != warm["base/brightness"]


def test_a_lora_of_another_rank_is_refused_with_the_fix(runs, tmp_path):
    ckpt = Path(runs["lora"]["checkpoint"])
    cfg = tiny_config(tmp_path, overrides=FAST + ["model.lora_rank=4", f"model.init_from={ckpt}"])
    with pytest.raises(WarmStartError, match=r"rank 8 and alpha 16; this run's is rank 4, alpha 8\. Fix: set model.lora_rank: 8"):
        built(cfg)
    # a bare file without metadata: its rank is read off its tensors
    file = tmp_path / "bare.safetensors"
    save_file(load_file(ckpt / "lora" / "pytorch_lora_weights.safetensors"), file)
    with pytest.raises(WarmStartError, match=r"rank 8 and alpha 8 \(its file has no lora_adapter_metadata"):
        built(tiny_config(tmp_path, overrides=FAST + ["model.lora_rank=4", f"model.init_from={file}"]))


def test_a_lora_file_without_metadata_starts_where_diffusers_puts_it(runs, tmp_path):
    """diffusers applies a LoRA file without lora_adapter_metadata at alpha = rank (scale 1); a run at its
    default alpha 2 x rank loaded it at twice that strength, silently. Now it is told to set the alpha,
    and with it starts from the model diffusers' own loader makes."""
    file = tmp_path / "sft.safetensors"  # e.g. an SFT LoRA saved by a diffusers training script
    save_file(load_file(Path(runs["lora"]["checkpoint"]) / "lora" / "pytorch_lora_weights.safetensors"), file)
    with pytest.raises(WarmStartError, match=r"rank 8 and alpha 8 .*this run's is rank 8, alpha 16\. Fix: set "
                                             r"model.lora_rank: 8 and model.lora_alpha: 8"):
        built(tiny_config(tmp_path / "a", overrides=FAST + [f"model.init_from={file}"]))
    cfg = tiny_config(tmp_path / "b", overrides=FAST + ["model.lora_alpha=8", f"model.init_from={file}"])
    ours, _ = built(cfg)
    theirs = load_adapter(cfg.model, device=torch.device("cpu"), seed=cfg.train.seed)
    theirs.transformer.load_lora_adapter(str(file), prefix="transformer", adapter_name="sft")
    base = load_adapter(cfg.model, device=torch.device("cpu"), seed=cfg.train.seed)
    assert not torch.allclose(velocity(theirs), velocity(base), atol=1e-4)  # the LoRA does something
    torch.testing.assert_close(velocity(ours), velocity(theirs), rtol=1e-5, atol=1e-5)


def test_what_init_from_cannot_be(tmp_path):
    with pytest.raises(WarmStartError, match="does not exist"):
        find_source(tmp_path / "nowhere", ["transformer"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(WarmStartError, match="is none of: a flowrl checkpoint"):
        find_source(tmp_path / "empty", ["transformer"])
    (tmp_path / "one.safetensors").write_bytes(b"")
    with pytest.raises(WarmStartError, match="two experts"):
        find_source(tmp_path / "one.safetensors", ["transformer", "transformer_2"])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"config": {"model": {"finetune_type": "lora", "lora_rank": 8}}}))
    with pytest.raises(WarmStartError, match="has no weights for transformer"):
        find_source(ckpt, ["transformer"])


def test_a_sampler_builds_the_same_base_for_a_lora_run_on_full_weights(runs, tmp_path):
    """Samplers get only the LoRA published; the base under it must be the warm start too."""
    from services.sampler.runtime import SamplerRuntime

    ckpt = Path(runs["full"]["checkpoint"])
    cfg = tiny_config(tmp_path, overrides=FAST + [f"model.init_from={ckpt}"])
    trainer_side, _ = built(cfg)
    runtime = SamplerRuntime(device=torch.device("cpu"))
    runtime.ensure_model(cfg.model.model_dump(), seed=cfg.train.seed)
    for adapter in (trainer_side, runtime.adapter):
        adapter.transformer.disable_adapters()
    torch.testing.assert_close(velocity(runtime.adapter), velocity(trainer_side), rtol=0, atol=0)
