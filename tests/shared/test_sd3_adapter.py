"""The ``sd3-5`` adapter on a tiny random ``StableDiffusion3Pipeline`` (built offline from configs,
locally trained CLIP BPE): loading with ``from_pretrained``, rollouts, train/inference log-prob
consistency, LoRA training saved in a format diffusers' own ``load_lora_weights`` reads, and
full fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.config import ModelConfig, parse_config
from shared.flow import flow_sigmas, sde_step
from shared.models import MODELS, load_adapter
from shared.sampling import rollout
from shared.toy.pipeline import TEST_SIZES, build_tokenizer, build_toy_pipeline, save_toy_pipeline

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle",
           "a photo of a circle left of a square"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd3")
    build_tokenizer(root / "tok", corpus=PROMPTS + ["a photo of one green cyan purple yellow"])
    pipe = build_toy_pipeline(TEST_SIZES, seed=0, tokenizer_dir=root / "tok")
    return save_toy_pipeline(pipe, root / "pipe")


@pytest.fixture(scope="module")
def adapter(pipeline_dir):
    return load_adapter(ModelConfig(model_type="sd3-5", model_name_or_path=str(pipeline_dir)),
                        device=torch.device("cpu"), seed=0)


def test_registered_and_loaded_from_a_local_folder(adapter, pipeline_dir):
    from diffusers import StableDiffusion3Pipeline

    assert type(adapter) is MODELS.get("sd3-5")
    assert isinstance(adapter.pipeline, StableDiffusion3Pipeline)
    assert adapter.pipeline.text_encoder_3 is None
    assert adapter.options["max_sequence_length"] == 0  # from the folder's flowrl.json
    assert json.loads((pipeline_dir / "flowrl.json").read_text()) == {"max_sequence_length": 0}
    assert adapter.latent_shape((64, 64)) == (4, 16, 16)
    assert not any(p.requires_grad for p in adapter.pipeline.text_encoder.parameters())
    assert not any(p.requires_grad for p in adapter.pipeline.vae.parameters())


def test_explicit_option_beats_folder_default(pipeline_dir):
    cfg = ModelConfig(model_type="sd3-5", model_name_or_path=str(pipeline_dir),
                      options={"max_sequence_length": 4})
    a = load_adapter(cfg, device=torch.device("cpu"), seed=0)
    cond = a.encode_prompts(PROMPTS[:2], cfg=False)
    # 16 CLIP tokens + 4 zero "T5" tokens, as the pipeline builds them without T5
    assert cond.tensors["prompt_embeds"].shape == (2, 16 + 4, 32)


def test_encode_prompts_shapes_and_negatives(adapter):
    cond = adapter.encode_prompts(PROMPTS, cfg=True, negative_prompts=["blurry"] * 4)
    assert cond.tensors["prompt_embeds"].shape == (4, 16, 32)
    assert cond.tensors["pooled"].shape == (4, 32)
    assert cond.negative["prompt_embeds"].shape == (4, 16, 32)
    # same prompt -> same encoding; different prompts differ
    again = adapter.encode_prompts(PROMPTS[:1], cfg=False)
    torch.testing.assert_close(again.tensors["pooled"][0], cond.tensors["pooled"][0])
    assert not torch.allclose(cond.tensors["pooled"][0], cond.tensors["pooled"][1])


def test_bad_resolution_names_the_fix(adapter):
    with pytest.raises(ValueError, match="multiples of 8.*train.resolution"):
        adapter.latent_shape((60, 64))


@pytest.mark.parametrize("dynamics", ["Flow-SDE", "Dance-SDE", "CPS"])
def test_rollout_and_logprob_consistency(adapter, dynamics):
    """Rollout log-probs equal the log-probs recomputed from the stored step inputs (float32)."""
    cond = adapter.encode_prompts(PROMPTS, cfg=False)
    sigmas = flow_sigmas(6, adapter.scheduler_shift)
    roll = rollout(adapter, cond, [0, 1, 2, 3], resolution=(32, 32), sigmas=sigmas,
                   guidance_scale=1.0, dynamics=dynamics, noise_level=0.5, sde_steps=[0, 2, 4])
    assert roll.images.shape == (4, 3, 32, 32)
    assert 0.0 <= roll.images.min() and roll.images.max() <= 1.0
    assert roll.log_probs.shape == (4, 3)
    for j, i in enumerate(roll.sde_steps):
        x = roll.latents[:, j]
        sigma, sigma_next = sigmas[i].expand(4), sigmas[i + 1].expand(4)
        with torch.no_grad():
            v = adapter.velocity(x, sigma, cond, 1.0)
        out = sde_step(x, v, sigma, sigma_next, dynamics=dynamics, noise_level=0.5,
                       prev_sample=roll.next_latents[:, j])
        torch.testing.assert_close(out.log_prob, roll.log_probs[:, j], rtol=0, atol=1e-5)


def test_cfg_velocity_is_one_batched_call(adapter):
    cond = adapter.encode_prompts(PROMPTS[:2], cfg=True)
    x = torch.randn(2, 4, 4, 4)
    sigma = torch.tensor([0.7, 0.3])
    calls = []
    handle = adapter.transformer.register_forward_hook(lambda m, a, kw: calls.append(1))
    try:
        with torch.no_grad():
            v = adapter.velocity(x, sigma, cond, 3.0)
    finally:
        handle.remove()
    assert len(calls) == 1 and v.shape == x.shape
    with torch.no_grad():
        v_c = adapter.velocity(x, sigma, type(cond)(cond.tensors), 1.0)
        v_u = adapter.velocity(x, sigma, type(cond)(cond.negative), 1.0)
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)


def test_a_bf16_transformer_gets_the_pipelines_float32_timestep(pipeline_dir):
    """StableDiffusion3Pipeline passes the scheduler's float32 timesteps to a bf16 transformer; the
    adapter rounded 1000 * sigma to bf16 first (964.29 -> 964, 818.18 -> 820): another noise level."""
    cfg = ModelConfig(model_type="sd3-5", model_name_or_path=str(pipeline_dir), options={"transformer_dtype": "bfloat16"})
    a = load_adapter(cfg, device=torch.device("cpu"), seed=0)
    assert a.transformer.dtype == torch.bfloat16
    seen = []
    handle = a.transformer.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["timestep"]), with_kwargs=True)
    sigma = torch.tensor([0.9642857, 0.8181818])
    try:
        with torch.no_grad():
            a.velocity(torch.randn(2, 4, 4, 4), sigma, a.encode_prompts(PROMPTS[:2], cfg=False), 1.0)
    finally:
        handle.remove()
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], sigma * 1000.0)


def test_decode_inverts_encode_normalization(adapter):
    images = torch.rand(2, 3, 32, 32)
    z = adapter.encode_latents(images)
    assert z.shape == (2, 4, 8, 8)
    assert adapter.decode(z).shape == (2, 3, 32, 32)


def test_not_a_pipeline_folder(tmp_path):
    cfg = ModelConfig(model_type="sd3-5", model_name_or_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_adapter(cfg, device=torch.device("cpu"), seed=0)
    with pytest.raises(ValueError, match="model_name_or_path is required"):
        load_adapter(ModelConfig(model_type="sd3-5"), device=torch.device("cpu"), seed=0)


def test_unknown_option(pipeline_dir):
    cfg = ModelConfig(model_type="sd3-5", model_name_or_path=str(pipeline_dir),
                      options={"max_seq_len": 3})
    with pytest.raises(ValueError, match="unknown sd3-5 option"):
        load_adapter(cfg, device=torch.device("cpu"), seed=0)


# --------------------------------------------------------------------------- training


def _train_cfg(pipeline_dir, out, data_dir, **model):
    data_dir.mkdir(exist_ok=True)
    (data_dir / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    raw = {
        "output_dir": str(out), "run_name": "r", "logging_backend": "none",
        "model": {"model_type": "sd3-5", "model_name_or_path": str(pipeline_dir), "lora_rank": 4, **model},
        "data": {"dataset_dir": str(data_dir)},
        "train": {"trainer_type": "grpo", "resolution": 32, "num_inference_steps": 4, "group_size": 4,
                  "unique_sample_num_per_epoch": 2, "per_device_batch_size": 8,
                  "gradient_step_per_epoch": 1, "max_epochs": 1, "learning_rate": 1e-2,
                  "clip_range": 0.1},
        "eval": {"num_inference_steps": 2, "eval_freq": 0, "num_prompts": 2},
        "rewards": [{"reward_model": "brightness"}],
    }
    return parse_config(raw)


@pytest.fixture(scope="module")
def lora_run(pipeline_dir, tmp_path_factory):
    from trainer.loop import train

    root = tmp_path_factory.mktemp("lora_run")
    cfg = _train_cfg(pipeline_dir, root / "runs", root / "data")
    return cfg, train(cfg, quiet=True)


def test_default_lora_targets_cover_both_streams(lora_run):
    from safetensors import safe_open

    _, summary = lora_run
    path = Path(summary["checkpoint"]) / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    for target in ("attn.to_q", "attn.to_out.0", "attn.add_k_proj", "attn.to_add_out"):
        assert any(f".{target}.lora_A" in k for k in keys), target


def test_lora_loads_with_the_pipelines_load_lora_weights(lora_run, pipeline_dir):
    """The checkpoint a user gets loads into the plain diffusers pipeline and changes its output."""
    from diffusers import StableDiffusion3Pipeline

    _, summary = lora_run
    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir, text_encoder_3=None, tokenizer_3=None,
                                                    image_encoder=None, feature_extractor=None)
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=2, height=32, width=32, max_sequence_length=0,
                  output_type="pt", guidance_scale=1.0)
    base = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(Path(summary["checkpoint"]) / "lora"))
    assert pipe.transformer.peft_config, "no LoRA adapter was attached"
    tuned = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (tuned - base).abs().max() > 1e-4, "the loaded LoRA does not change the output"


def test_full_finetune_trains_every_transformer_weight(pipeline_dir, tmp_path):
    from diffusers import SD3Transformer2DModel

    from trainer.loop import train

    cfg = _train_cfg(pipeline_dir, tmp_path / "runs", tmp_path / "data", finetune_type="full")
    summary = train(cfg, quiet=True)
    saved = SD3Transformer2DModel.from_pretrained(Path(summary["checkpoint"]) / "transformer")
    base = SD3Transformer2DModel.from_pretrained(pipeline_dir / "transformer")
    changed = [n for (n, p), q in zip(saved.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert changed and any("attn.to_q" in n for n in changed)


def test_toy_sizes_default_is_the_shipped_shape_and_wider_text_encoders_build(tmp_path):
    """``toy_sizes`` (``scripts/pretrain_toy.py --text-width/--text-layers``): the defaults are
    TOY_SIZES; wider, deeper text encoders give a pipeline whose transformer reads them."""
    from shared.toy.pipeline import TOY_SIZES, toy_sizes

    assert toy_sizes() == TOY_SIZES
    sizes = toy_sizes(text_width=96, text_layers=3)
    assert sizes["text"]["num_hidden_layers"] == 3 and sizes["transformer"]["joint_attention_dim"] == 192
    assert TOY_SIZES["text"]["hidden_size"] == 64  # the shared default is not modified
    pipe = build_toy_pipeline(sizes, seed=0, tokenizer_dir=None)
    assert pipe.text_encoder.config.hidden_size == 96 and pipe.text_encoder_2.config.num_hidden_layers == 3
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(["a photo of a red circle"], None, None, device="cpu",
                                              do_classifier_free_guidance=False, max_sequence_length=0)
        out = pipe.transformer(hidden_states=torch.randn(1, 4, 16, 16), timestep=torch.tensor([500.0]),
                               encoder_hidden_states=pe, pooled_projections=pooled, return_dict=False)[0]
    assert pe.shape[-1] == 192 and pooled.shape == (1, 192) and out.shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="multiple of 32"):
        toy_sizes(text_width=80)
    deeper = build_toy_pipeline(toy_sizes(dit_layers=6), seed=0, tokenizer_dir=None).transformer
    assert len(deeper.transformer_blocks) == 6 and TOY_SIZES["transformer"]["num_layers"] == 4
    with pytest.raises(ValueError, match="dit_layers"):
        toy_sizes(dit_layers=0)
