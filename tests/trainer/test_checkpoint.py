"""Checkpoints are loadable elsewhere: the LoRA with diffusers' ``load_lora_adapter`` (the
PEFT/diffusers format), a full fine-tune with ``SD3Transformer2DModel.from_pretrained``, and
both with flowrl's own ``load_checkpoint_weights`` -- all giving the weights training ended
with (checked against the live model's checksum that the trainer writes per rank)."""

from __future__ import annotations

import json
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

# smaller than the demo so each run takes about a second once the process is warm
FAST = ["train.num_inference_steps=4", "eval.num_inference_steps=4", "train.group_size=4",
        "train.unique_sample_num_per_epoch=2", "train.per_device_batch_size=8",
        "train.gradient_step_per_epoch=1", "train.clip_range=0.01"]


def _train(root: Path, overrides: list[str]):
    cfg = tiny_config(root, overrides=FAST + overrides)
    summary = train(cfg, quiet=True)
    state = json.loads((Path(summary["run_dir"]) / "rank0_state.json").read_text())
    return cfg, Path(summary["checkpoint"]), state


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("lora"), [])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("full"), ["model.finetune_type=full"])


def fresh_policy(cfg):
    """What ``flowrl eval`` builds: base model (same seed -> same base weights) + new LoRA."""
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=cfg.train.seed)
    trainable = attach_trainable(adapter, cfg)
    return adapter, Policy(adapter, adapter.transformer, cfg, trainable)


def checksum(tensors) -> tuple[float, float]:
    tensors = list(tensors)
    return (float(sum(t.detach().double().sum() for t in tensors)),
            float(sum(t.detach().double().abs().sum() for t in tensors)))


@torch.no_grad()
def velocity(adapter, transformer=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 3, 16, 16, generator=g)
    sigma = torch.tensor([0.9, 0.4])
    cond = adapter.encode_prompts(["a red circle", "a blue square"], cfg=False)
    return adapter.velocity(x, sigma, cond, 1.0, transformer=transformer)


# --------------------------------------------------------------------------- LoRA


def test_lora_checkpoint_layout(lora_run):
    cfg, ckpt, _ = lora_run
    assert (ckpt / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (ckpt / "ema.safetensors").is_file()
    assert not (ckpt / "transformer").exists()
    assert not ckpt.with_name(ckpt.name + ".tmp").exists()  # the temp folder was renamed away
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["optimizer_step"] == 2
    assert state["config"]["model"]["finetune_type"] == "lora"
    # diffusers pipeline LoRA format: PEFT lora_A / lora_B tensors under "transformer.", and the
    # LoraConfig (rank, alpha, targets) in the metadata under the same prefix
    with safe_open(str(ckpt / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    lora_meta = json.loads(meta["lora_adapter_metadata"])
    assert lora_meta["transformer.r"] == cfg.model.lora_rank
    assert lora_meta["transformer.lora_alpha"] == 2 * cfg.model.lora_rank


def test_saved_lora_equals_the_trained_weights(lora_run):
    cfg, ckpt, live = lora_run
    saved = load_file(ckpt / "lora" / "pytorch_lora_weights.safetensors")
    # the file holds exactly the parameters training ended with
    assert checksum(saved.values()) == pytest.approx((live["param_checksum"], live["param_abs_sum"]),
                                                     rel=1e-9, abs=1e-9)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items()), \
        "lora_B is still zero: training did not move the adapter"
    for _ in range(2):  # loading is deterministic: two fresh policies get identical weights
        _, policy = fresh_policy(cfg)
        load_checkpoint_weights(ckpt, cfg, policy.adapter, policy)
        loaded = {n.replace(".default.", "."): p for n, p in policy.trainable.items()}
        assert set(loaded) == {k.removeprefix("transformer.") for k in saved}
        for k, v in saved.items():
            torch.testing.assert_close(loaded[k.removeprefix("transformer.")], v, rtol=0, atol=0)


def test_unprefixed_lora_file_still_loads(lora_run, tmp_path):
    """Files written by ``transformer.save_lora_adapter`` (no ``transformer.`` prefix, as older
    flowrl checkpoints were) load into the same weights."""
    import shutil

    from safetensors.torch import save_file

    cfg, ckpt, _ = lora_run
    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    weights = old / "lora" / "pytorch_lora_weights.safetensors"
    saved = load_file(weights)
    save_file({k.removeprefix("transformer."): v for k, v in saved.items()}, weights)
    _, policy = fresh_policy(cfg)
    load_checkpoint_weights(old, cfg, policy.adapter, policy)
    loaded = {n.replace(".default.", "."): p for n, p in policy.trainable.items()}
    for k, v in saved.items():
        torch.testing.assert_close(loaded[k.removeprefix("transformer.")], v, rtol=0, atol=0)


def test_lora_loads_with_diffusers_load_lora_adapter(lora_run):
    cfg, ckpt, _ = lora_run
    base, _ = fresh_policy(cfg)  # attach_trainable adds an untrained LoRA; switch it off below
    base.transformer.disable_adapters()
    v_base = velocity(base)

    # flowrl's loader (EMA deliberately not used: we call the raw transformer)
    ours, policy = fresh_policy(cfg)
    load_checkpoint_weights(ckpt, cfg, ours, policy, use_ema=False)
    v_ours = velocity(ours)

    # plain diffusers, as a user would outside flowrl (default prefix="transformer")
    plain = load_adapter(cfg.model, device=torch.device("cpu"), seed=cfg.train.seed)
    torch.testing.assert_close(velocity(plain), v_base)  # same seed -> same base model
    plain.transformer.load_lora_adapter(str(ckpt / "lora"), adapter_name="trained",
                                        use_safetensors=True)
    assert list(plain.transformer.peft_config) == ["trained"]
    assert plain.transformer.peft_config["trained"].lora_alpha == 2 * cfg.model.lora_rank
    v_diffusers = velocity(plain)

    assert not torch.allclose(v_diffusers, v_base), "the loaded LoRA has no effect"
    torch.testing.assert_close(v_diffusers, v_ours, rtol=1e-5, atol=1e-6)


def test_lora_loads_like_a_pipelines_load_lora_weights(lora_run):
    """``StableDiffusion3Pipeline.load_lora_weights(dir)`` = these two class methods (without
    having to build a whole pipeline with text encoders and a VAE)."""
    from diffusers.loaders import SD3LoraLoaderMixin

    cfg, ckpt, _ = lora_run
    ours, policy = fresh_policy(cfg)
    load_checkpoint_weights(ckpt, cfg, ours, policy, use_ema=False)
    plain = load_adapter(cfg.model, device=torch.device("cpu"), seed=cfg.train.seed)
    state, meta = SD3LoraLoaderMixin.lora_state_dict(str(ckpt / "lora"), return_lora_metadata=True)
    SD3LoraLoaderMixin.load_lora_into_transformer(state, plain.transformer, adapter_name="trained",
                                                  metadata=meta)
    assert list(getattr(plain.transformer, "peft_config", {})) == ["trained"], "nothing was loaded"
    torch.testing.assert_close(velocity(plain), velocity(ours), rtol=1e-5, atol=1e-6)


def test_ema_restored_only_when_asked(lora_run):
    cfg, ckpt, _ = lora_run
    ema_file = load_file(ckpt / "ema.safetensors")
    _, policy = fresh_policy(cfg)
    before = {k: v.clone() for k, v in policy.ema.shadow.items()}
    load_checkpoint_weights(ckpt, cfg, policy.adapter, policy, use_ema=False)
    for k, v in policy.ema.shadow.items():
        torch.testing.assert_close(v, before[k])
    load_checkpoint_weights(ckpt, cfg, policy.adapter, policy)
    assert set(policy.ema.shadow) == set(ema_file)
    for k, v in ema_file.items():
        torch.testing.assert_close(policy.ema.shadow[k], v, rtol=0, atol=0)


def test_the_ema_lora_is_saved_loadable_and_is_what_evaluation_scores(lora_run):
    """Evaluation scores the EMA weights; lora_ema/ holds them in diffusers' format, so what a user
    loads is what the report measured."""
    cfg, ckpt, _ = lora_run
    ema_file = load_file(ckpt / "lora_ema" / "pytorch_lora_weights.safetensors")
    live_file = load_file(ckpt / "lora" / "pytorch_lora_weights.safetensors")
    shadow = load_file(ckpt / "ema.safetensors")
    assert ema_file.keys() == live_file.keys()
    for k, v in shadow.items():
        torch.testing.assert_close(ema_file["transformer." + k.replace(".default.", ".")], v, rtol=0, atol=0)
    assert any(not torch.equal(ema_file[k], live_file[k]) for k in live_file), "EMA equals the live LoRA"

    ours, policy = fresh_policy(cfg)
    load_checkpoint_weights(ckpt, cfg, ours, policy)
    v_eval = velocity(ours, transformer=policy.eval_module())
    plain = load_adapter(cfg.model, device=torch.device("cpu"), seed=cfg.train.seed)
    plain.transformer.load_lora_adapter(str(ckpt / "lora_ema"), prefix="transformer", use_safetensors=True)
    torch.testing.assert_close(velocity(plain), v_eval, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- full fine-tune


def test_full_finetune_saves_a_from_pretrained_transformer(full_run):
    from diffusers import SD3Transformer2DModel

    cfg, ckpt, live = full_run
    assert (ckpt / "transformer" / "config.json").is_file()
    assert not (ckpt / "lora").exists()
    model = SD3Transformer2DModel.from_pretrained(ckpt / "transformer")
    params = dict(model.named_parameters())
    # every parameter was trainable: the saved model is the trained one
    assert checksum(params.values()) == pytest.approx(
        (live["param_checksum"], live["param_abs_sum"]), rel=1e-9)

    base = load_adapter(cfg.model, device=torch.device("cpu"), seed=cfg.train.seed)
    v_base = velocity(base)
    v_saved = velocity(base, transformer=model)
    assert not torch.allclose(v_saved, v_base), "full fine-tune saved the untrained model"

    # flowrl's loader puts the same weights into a freshly built model
    ours, policy = fresh_policy(cfg)
    load_checkpoint_weights(ckpt, cfg, ours, policy, use_ema=False)
    for n, p in ours.transformer.named_parameters():
        torch.testing.assert_close(p, params[n], rtol=0, atol=0)
    torch.testing.assert_close(velocity(ours), v_saved)


def test_a_full_runs_final_checkpoint_has_its_ema_as_a_from_pretrained_transformer(full_run):
    from diffusers import SD3Transformer2DModel

    cfg, ckpt, _ = full_run
    ema_model = SD3Transformer2DModel.from_pretrained(ckpt / "transformer_ema")
    live = dict(SD3Transformer2DModel.from_pretrained(ckpt / "transformer").named_parameters())
    shadow = load_file(ckpt / "ema.safetensors")
    params = dict(ema_model.named_parameters())
    assert params.keys() == shadow.keys()
    for k, v in shadow.items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=0)
    assert any(not torch.equal(params[k], live[k]) for k in live), "EMA equals the live weights"


# --------------------------------------------------------------------------- errors


def test_non_checkpoint_dir_raises(tmp_path, lora_run):
    cfg, _, _ = lora_run
    adapter, policy = fresh_policy(cfg)
    (tmp_path / "lora").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint_weights(tmp_path, cfg, adapter, policy)
    msg = str(info.value)
    assert str(tmp_path) in msg and "trainer_state.json" in msg and "checkpoints/" in msg
