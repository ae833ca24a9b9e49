"""``model.options.transformer_dtype``: the denoiser read in bfloat16 (as Flow-Factory keeps frozen
weights in the mixed-precision dtype), on every pipeline family.

Checks: the weights are read in it (the model's own float32 modules excepted), about half the
bytes; the velocity runs without autocast (samplers do not autocast) and stays within bf16's error
of the float32 model's; under a LoRA run the trained weights stay float32 (the master dtype) and
the frozen ones bfloat16; a full fine-tune casts everything it trains to the master dtype; a bad
value names the choices."""

from __future__ import annotations

import pytest
import torch

from shared.config import ModelConfig
from shared.models import load_adapter
from tests.helpers.tiny_pipelines import PROMPTS, TINY_PIPELINES, tiny_train_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = TINY_PIPELINES[name].save(tmp_path_factory.mktemp(name.replace("-", "_")) / "pipe")
        return cache[name]

    return get


def load(spec, path, dtype):
    cfg = ModelConfig(model_type=spec.model_type, model_name_or_path=str(path),
                      options={**spec.options, "transformer_dtype": dtype})
    return load_adapter(cfg, device=torch.device("cpu"), seed=0)


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# text-only families whose inputs the test can build without condition images
@pytest.mark.parametrize("family", ["sd3-5", "flux1", "qwen-image", "z-image", "flux2-klein", "wan2_t2v-a14b"])
def test_the_denoiser_is_read_in_bfloat16_and_runs_without_autocast(saved, family):
    spec = TINY_PIPELINES[family]
    full, half = load(spec, saved(family), None), load(spec, saved(family), "bfloat16")
    keep = {k for m in half.transformer.modules() for k in (getattr(m, "_keep_in_fp32_modules", None) or [])}
    for name, p in half.transformer.named_parameters():
        if not any(k in name for k in keep):
            assert p.dtype == torch.bfloat16, name
    assert nbytes(half.transformer) <= 0.6 * nbytes(full.transformer)
    assert {p.dtype for p in half.pipeline.text_encoder.parameters()} == {torch.float32}  # text_dtype's business

    cond_full = full.encode_prompts(PROMPTS[:2], cfg=True, negative_prompts=["", ""])
    cond_half = half.encode_prompts(PROMPTS[:2], cfg=True, negative_prompts=["", ""])
    shape = full.sample_shape(tuple(spec.resolution), spec.options.get("num_frames") if full.video else None)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        v_full = full.velocity(x, sigma, cond_full, spec.guidance_scale)
        v_half = half.velocity(x, sigma, cond_half, spec.guidance_scale)
    assert v_half.dtype == torch.float32 and torch.isfinite(v_half).all()
    rel = float((v_half - v_full).norm() / v_full.norm())
    assert 0 < rel < 0.1, rel  # bf16 rounding (1e-2 here), not another model


def test_a_lora_run_keeps_its_trained_weights_in_the_master_dtype(saved, tmp_path):
    from trainer.loop import train
    from trainer.policy import attach_trainable

    spec = TINY_PIPELINES["flux1"]
    cfg = tiny_train_config(spec, saved("flux1"), tmp_path,
                            model={"options": {**spec.options, "transformer_dtype": "bfloat16"}},
                            train={"mixed_precision": "bf16", "max_epochs": 1})
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    trainable = attach_trainable(adapter, cfg)
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    frozen = {p.dtype for n, p in adapter.transformer.named_parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # this test's mixed precision, not another test's
    try:
        summary = train(cfg, quiet=True)
    finally:
        AcceleratorState._reset_state()
    assert summary["epochs"] == 1 and summary["final/brightness"] == summary["final/brightness"]  # not NaN

    full_cfg = tiny_train_config(spec, saved("flux1"), tmp_path / "full",
                                 model={"finetune_type": "full",
                                        "options": {**spec.options, "transformer_dtype": "bfloat16"}})
    adapter = load_adapter(full_cfg.model, device=torch.device("cpu"), seed=0)
    attach_trainable(adapter, full_cfg)
    assert {p.dtype for p in adapter.transformer.parameters()} == {torch.float32}


def test_a_dtype_flowrl_does_not_run_is_refused_with_the_choices(saved):
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        load(TINY_PIPELINES["sd3-5"], saved("sd3-5"), "int8")
