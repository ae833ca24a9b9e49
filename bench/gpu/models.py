"""(issue 4, item 6) Every model family on the device: a real-size-architecture instance with random
weights (bf16) runs one rollout and one LoRA training step through flowrl's own adapter, at a
reduced resolution; time and peak memory per family.

    python bench/gpu/models.py                                   # all ten families, 256 px / 256x256x5
    python bench/gpu/models.py --families flux2 wan2_i2v         # some of them
    python bench/gpu/models.py --doc --from bench/results/gpu_models.json   # rewrite docs/models.md's table
    python bench/gpu/models.py --smoke --device cpu              # tiny pipelines, any machine (tests)
    python bench/gpu/models.py --device cpu --max-layers 1 --resolution 64 --steps 2 --sde-steps 1 \
        [--dtype bfloat16]      # CPU check of the real widths / VAEs / text side, one block per stack

Per family (:data:`FAMILIES`): the diffusers pipeline of the family with

* the transformer of a named checkpoint's ``transformer/config.json`` (values and their sources in
  :func:`transformer_config`), built on the meta device and materialised directly on the device in
  bf16 with random weights (norm weights 1, biases 0, other weights N(0, 1/fan_in)), so a 32 B model
  never exists in float32 on the host;
* the real VAE config of that checkpoint (:func:`build_vae`);
* text encoders of the real classes with the real OUTPUT widths (what the transformer consumes:
  hidden size, pooled width, stacked layers) but 2-3 narrow layers (:func:`build_text_side`):
  real-size encoders (T5-XXL 4.7 B, Qwen2.5-VL-7B, Mistral-Small-24B, ...) would dominate memory and
  build time and measure nothing of flowrl; a training run encodes each prompt once and caches it.
  Tokenizers are the offline ones of :mod:`tests.helpers.tiny_pipelines` (CLIP BPE, T5/UMT5
  Unigram, Qwen BPE, Mistral-style BPE), so prompts are a few dozen tokens.

It is loaded with ``MODELS.get(model_type).from_pipeline(pipe, options, device)``, then

* rollout: ``shared.sampling.rollout_batches`` (prompt encoding through the embedding cache,
  Flow-SDE on the first ``--sde-steps`` of ``--steps`` steps, CFG with negative prompts or the
  embedded guidance as the family uses, condition images for the edit / image-to-video families as
  ``tests.helpers.tiny_edit_pipelines.condition_rows`` makes them, ``--frames`` frames for video,
  VAE decode), ``--batch`` samples;
* LoRA step: ``trainer.policy.attach_trainable`` (the adapter's default LoRA targets, rank
  ``--lora-rank``), one loss + backward through ``adapter.velocity`` on the rollout's first SDE
  state (bf16 autocast on CUDA), AdamW from ``trainer.loop.build_optimizer``.

Recorded per family: ``rollout_s`` / ``train_step_s`` (each repeated ``--repeats`` times: the last
is reported, the first as ``*_first_s``, which includes CUDA warm-up), ``build_s``, ``weights_gib``
(allocated after building), ``peak_gib`` (``torch.cuda.max_memory_allocated`` over rollout + step;
0 on CPU), parameter counts, ``status`` (``ok`` / ``error``) and the error text. A failing family
does not stop the others; the result file is rewritten after every family, so a run cut short by
a time limit keeps what it measured.

``--smoke``: the tiny pipelines of ``tests.helpers.tiny_pipelines.TINY_PIPELINES`` for every family
(their resolution, options, 3 steps); numbers measure nothing and are never written to the docs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from common import ROOT, environment, peak_memory, synchronize, vae_config, write_result  # noqa: I001
from common import flux1_transformer_config, materialize, sd35m_transformer_config  # noqa: E402

DOC = ROOT / "docs" / "models.md"
START, END = "<!-- gpu_models:start -->", "<!-- gpu_models:end -->"


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    checkpoint: str  # the checkpoint whose transformer / VAE architecture is built
    text: str  # what the text side is, for the docs
    condition_images: int = 0  # per sample (edit / image-to-video families)
    video: bool = False


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("sd3-5", "stabilityai/stable-diffusion-3.5-medium",
           "reduced: CLIP-L (768) + CLIP-G (1280) + T5 (4096), 2 layers each"),
    Family("flux1", "black-forest-labs/FLUX.1-dev", "reduced: CLIP-L (pooled 768) + T5 (4096), 2 layers each"),
    Family("flux1-kontext", "black-forest-labs/FLUX.1-Kontext-dev",
           "reduced: CLIP-L (pooled 768) + T5 (4096), 2 layers each", condition_images=1),
    Family("z-image", "Tongyi-MAI/Z-Image-Turbo", "reduced: Qwen3 (2560), 2 layers"),
    Family("qwen-image", "Qwen/Qwen-Image", "reduced: Qwen2.5-VL (3584), 2 layers, 1-layer vision tower"),
    Family("qwen-image-edit-plus", "Qwen/Qwen-Image-Edit-2509",
           "reduced: Qwen2.5-VL (3584), 2 layers, 1-layer vision tower (images <= 112 px)", condition_images=2),
    Family("flux2", "black-forest-labs/FLUX.2-dev",
           "reduced: Mistral3 (5120, 3 layers stacked = 15360) + 1-layer Pixtral"),
    Family("flux2-klein", "black-forest-labs/FLUX.2-klein-base-4B",
           "reduced: Qwen3 (2560, 3 layers stacked = 7680)"),
    Family("wan2_t2v", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "reduced: UMT5 (4096), 2 layers", video=True),
    Family("wan2_i2v", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
           "reduced: UMT5 (4096), 2 layers; CLIP vision (1280), 2 layers, 32 px", condition_images=1, video=True),
)}


# --------------------------------------------------------------------------- real configs


def transformer_config(model_type: str) -> tuple[str, dict[str, Any]]:
    """(diffusers class, ``transformer/config.json`` values) of the family's checkpoint."""
    if model_type == "sd3-5":
        # stabilityai/stable-diffusion-3.5-medium transformer/config.json (bench/gpu/common.py, 2.24 B)
        return "SD3Transformer2DModel", sd35m_transformer_config(False)
    if model_type in ("flux1", "flux1-kontext"):
        # black-forest-labs/FLUX.1-dev transformer/config.json (bench/gpu/common.py, 11.9 B): 19 double +
        # 38 single blocks, 24 x 128 heads, T5 4096 / CLIP 768, guidance embedding, rope (16, 56, 56);
        # diffusers scripts/convert_flux_to_diffusers.py. FLUX.1-Kontext-dev: the same FluxTransformer2DModel
        # config (in_channels 64, guidance_embeds true; the condition image enters as extra tokens) --
        # not re-read from Kontext's own config.json here.
        return "FluxTransformer2DModel", flux1_transformer_config(False)
    if model_type == "z-image":
        # Tongyi-MAI/Z-Image-Turbo transformer/config.json as quoted in public ports (e.g. a candle
        # port's z_image transformer docs: dim 3840, n_heads 30, n_kv_heads 30, n_layers 30,
        # n_refiner_layers 2, in_channels 16, cap_feat_dim 2560 (Qwen3-4B), RoPE axes (32, 48, 48),
        # theta 256); they equal the defaults of diffusers' ZImageTransformer2DModel. axes_lens
        # [1024, 512, 512], norm_eps 1e-5, t_scale 1000: diffusers defaults, not confirmed from the file.
        return "ZImageTransformer2DModel", dict(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
            n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
            t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])
    if model_type in ("qwen-image", "qwen-image-edit-plus"):
        # Qwen/Qwen-Image transformer/config.json (20 B): 60 dual-stream blocks, 24 x 128 heads,
        # joint_attention_dim 3584 (Qwen2.5-VL-7B), in_channels 64 (16 latent ch x 2x2), out 16, patch 2,
        # rope (16, 56, 56): diffusers' QwenImageTransformer2DModel defaults, also quoted by public ports
        # (exo: 60 joint blocks 24 x 128; an MLX port's defaults in 64 / out 16 / 60 / 128 / 24 / 3584 / 2).
        # Qwen-Image-Edit-2509 uses the same transformer (zero_cond_t false; -2511 sets zero_cond_t true).
        return "QwenImageTransformer2DModel", dict(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
    if model_type == "flux2":
        # black-forest-labs/FLUX.2-dev (32 B): diffusers scripts/convert_flux2_to_diffusers.py,
        # get_flux2_transformer_config("flux2-dev")
        return "Flux2Transformer2DModel", dict(
            patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
            num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
            axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True)
    if model_type == "flux2-klein":
        # black-forest-labs/FLUX.2-klein(-base)-4B: diffusers scripts/convert_flux2_to_diffusers.py,
        # get_flux2_transformer_config("klein-4b") (5 double + 20 single blocks, 24 x 128, Qwen3-4B x 3 = 7680,
        # no guidance embedding; base and distilled share the architecture)
        return "Flux2Transformer2DModel", dict(
            patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
            axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False)
    if model_type == "wan2_t2v":
        # Wan-AI/Wan2.1-T2V-1.3B-Diffusers: diffusers scripts/convert_wan_to_diffusers.py,
        # get_transformer_config("Wan-T2V-1.3B")
        return "WanTransformer3DModel", dict(
            added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-6, ffn_dim=8960,
            freq_dim=256, in_channels=16, num_attention_heads=12, num_layers=30, out_channels=16,
            patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads", text_dim=4096)
    if model_type == "wan2_i2v":
        # Wan-AI/Wan2.1-I2V-14B-480P-Diffusers: diffusers scripts/convert_wan_to_diffusers.py,
        # get_transformer_config("Wan-I2V-14B-480p") (in_channels 36 = 16 noise + 16 condition + 4 mask;
        # CLIP ViT-H image embeddings 1280 wide)
        return "WanTransformer3DModel", dict(
            image_dim=1280, added_kv_proj_dim=5120, attention_head_dim=128, cross_attn_norm=True, eps=1e-6,
            ffn_dim=13824, freq_dim=256, in_channels=36, num_attention_heads=40, num_layers=40, out_channels=16,
            patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads", text_dim=4096)
    raise ValueError(f"unknown model_type {model_type!r}")


def build_vae(model_type: str):
    """The checkpoint's VAE (float32 on the host; the adapter casts it to ``vae_dtype``)."""
    import diffusers

    if model_type == "sd3-5":  # SD3.5 vae/config.json: 16 ch, 8x, scaling 1.5305, shift 0.0609 (common.py)
        return diffusers.AutoencoderKL(**vae_config(False, "sd3-5"))
    if model_type in ("flux1", "flux1-kontext", "z-image"):
        # FLUX.1 ae (Z-Image-Turbo ships the same VAE): 16 ch, 8x, scaling 0.3611, shift 0.1159 (common.py)
        return diffusers.AutoencoderKL(**vae_config(False, "flux1"))
    if model_type in ("qwen-image", "qwen-image-edit-plus"):
        # Qwen-Image vae/config.json = AutoencoderKLQwenImage defaults (base_dim 96, z_dim 16, dim_mult
        # [1, 2, 4, 4], temporal downsample [F, T, T], the 16 latents_mean / latents_std): the class
        # defaults, not compared value by value with the hub file here
        return diffusers.AutoencoderKLQwenImage()
    if model_type in ("flux2", "flux2-klein"):
        # FLUX.2 VAE: scripts/convert_flux2_to_diffusers.py builds it as AutoencoderKLFlux2() (32 ch,
        # (128, 256, 512, 512), batch-norm over 2x2 patches)
        return diffusers.AutoencoderKLFlux2()
    if model_type in ("wan2_t2v", "wan2_i2v"):
        # Wan2.1 VAE = AutoencoderKLWan defaults (z_dim 16, 8x space, 4x time, Wan2.1's latents_mean/std):
        # the class defaults, not compared value by value with the hub file here
        return diffusers.AutoencoderKLWan()
    raise ValueError(model_type)


# --------------------------------------------------------------------------- text side


def _tokenizer(builder, **kw):
    with tempfile.TemporaryDirectory() as tmp:
        return builder(Path(tmp), **kw)


def _clip(tok, width: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=tok.model_max_length, hidden_size=width,
                         intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, projection_dim=width,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(tok, width: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(vocab_size=len(tok), d_model=width, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
              relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return (UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))).eval()


def _qwen3(tok, width: int, layers: int, causal_lm: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=width, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg).eval()


def _qwen_vl(tok, width: int = 3584):
    """Qwen2.5-VL with Qwen2.5-VL-7B's width and attention layout (28 x 128 heads, 4 KV heads, mrope
    (16, 24, 24)) but 2 layers, a narrow MLP and a 1-layer vision tower projecting to ``width``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": width, "intermediate_size": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": len(tok),
                     "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "bos_token_id": ids("<|endoftext|>"),
                     "eos_token_id": ids("<|im_end|>"), "pad_token_id": tok.pad_token_id},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": width},
        vocab_size=len(tok), hidden_size=width, bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"))
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _mistral3(tok, width: int = 5120):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tok), "hidden_size": width,
                     "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 2048,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 16,
                       "image_size": 32, "patch_size": 8},
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    return Mistral3ForConditionalGeneration(config).eval()


def build_text_side(model_type: str) -> dict[str, Any]:
    """Pipeline components besides transformer / VAE / scheduler: tokenizers built offline and
    narrow text (and image) encoders with the real output widths."""
    from tests.helpers import tiny_pipelines as tp

    torch.manual_seed(0)
    if model_type == "sd3-5":
        clip_tok, t5_tok = _tokenizer(tp.build_clip_tokenizer), _tokenizer(tp.build_t5_tokenizer)
        # CLIP-L (hidden / projection 768) + CLIG-G (1280): 2048-wide pooled vector and hidden states
        # padded to T5-XXL's 4096
        return dict(text_encoder=_clip(clip_tok, 768, True), tokenizer=clip_tok,
                    text_encoder_2=_clip(clip_tok, 1280, True), tokenizer_2=clip_tok,
                    text_encoder_3=_t5(t5_tok, 4096), tokenizer_3=t5_tok)
    if model_type in ("flux1", "flux1-kontext"):
        clip_tok, t5_tok = _tokenizer(tp.build_clip_tokenizer), _tokenizer(tp.build_t5_tokenizer)
        return dict(text_encoder=_clip(clip_tok, 768, False), tokenizer=clip_tok,
                    text_encoder_2=_t5(t5_tok, 4096), tokenizer_2=t5_tok)
    if model_type == "z-image":  # Qwen3-4B: hidden 2560 (cap_feat_dim)
        tok = _tokenizer(tp.build_qwen_tokenizer)
        return dict(text_encoder=_qwen3(tok, 2560, 2, causal_lm=False), tokenizer=tok)
    if model_type == "qwen-image":
        tok = _tokenizer(tp.build_qwen_tokenizer)
        return dict(text_encoder=_qwen_vl(tok), tokenizer=tok)
    if model_type == "qwen-image-edit-plus":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from shared.models.qwen_vl_processor import image_only_processor
        from tests.helpers.tiny_edit_pipelines import QWEN_EDIT_TEMPLATE

        tok = _tokenizer(tp.build_qwen_tokenizer, templates=(tp.QWEN_IMAGE_TEMPLATE, QWEN_EDIT_TEMPLATE))
        processor = image_only_processor(Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112), tok)
        return dict(text_encoder=_qwen_vl(tok), tokenizer=tok, processor=processor)
    if model_type == "flux2":  # Mistral-Small-3.1 hidden 5120, 3 stacked layers = 15360
        tok = _tokenizer(tp.build_mistral_tokenizer)
        return dict(text_encoder=_mistral3(tok), tokenizer=tok)
    if model_type == "flux2-klein":  # Qwen3-4B hidden 2560, 3 stacked layers = 7680
        tok = _tokenizer(tp.build_qwen_tokenizer)
        return dict(text_encoder=_qwen3(tok, 2560, 3, causal_lm=True), tokenizer=tok)
    if model_type in ("wan2_t2v", "wan2_i2v"):  # UMT5-XXL: d_model 4096
        tok = _tokenizer(tp.build_t5_tokenizer)
        parts = dict(text_encoder=_t5(tok, 4096, umt5=True), tokenizer=tok)
        if model_type == "wan2_i2v":  # CLIP ViT-H/14: hidden 1280 (the penultimate layer is used)
            from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

            parts["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
                hidden_size=1280, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8, projection_dim=1280)).eval()
            parts["image_processor"] = CLIPImageProcessor(size={"shortest_edge": 32},
                                                          crop_size={"height": 32, "width": 32})
        return parts
    raise ValueError(model_type)


#: the block-count keys a ``--max-layers`` check caps
LAYER_KEYS = ("num_layers", "num_single_layers", "n_layers", "n_refiner_layers")


def build_real(model_type: str, device: torch.device, dtype: torch.dtype, max_layers: int | None = None):
    """The family's pipeline: the tiny pipeline's class, scheduler and pipeline settings
    (:data:`tests.helpers.tiny_pipelines.TINY_PIPELINES`, which carry the real scheduler configs),
    with the real-size transformer and VAE and the real-width text side."""
    from tests.helpers.tiny_pipelines import TINY_PIPELINES

    tiny = TINY_PIPELINES[model_type].build(0)
    settings = {k: v for k, v in tiny.config.items() if not k.startswith("_") and k not in tiny.components}
    cls_name, config = transformer_config(model_type)
    if max_layers is not None:  # a CPU check of the real widths (not a measurement)
        config = {k: min(v, max_layers) if k in LAYER_KEYS else v for k, v in config.items()}
    if model_type == "qwen-image-edit-plus":
        config = {**config, "zero_cond_t": False}  # 2509 (the tiny one mimics 2511)
    parts = {**tiny.components, **build_text_side(model_type), "vae": build_vae(model_type),
             "transformer": materialize(cls_name, config, device, dtype)}
    pipe = type(tiny)(**parts, **settings)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- one family


def adapter_options(model_type: str, smoke: bool, frames: int) -> dict[str, Any]:
    from tests.helpers.tiny_pipelines import TINY_PIPELINES

    if smoke:
        return dict(TINY_PIPELINES[model_type].options)
    o: dict[str, Any] = {}
    if model_type in ("flux2", "flux2-klein"):
        o["text_encoder_out_layers"] = [1, 2, 3]  # the reduced encoders have 3 layers
    if model_type in ("wan2_t2v", "wan2_i2v"):
        o["num_frames"] = frames
    return o


def run_family(fam: Family, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import diffusers

    from shared.config import parse_config
    from shared.models import MODELS
    from shared.sampling import rollout_batches
    from tests.helpers.tiny_edit_pipelines import condition_rows
    from tests.helpers.tiny_pipelines import NEGATIVE, PROMPTS, TINY_PIPELINES
    from trainer.loop import build_optimizer
    from trainer.policy import attach_trainable

    spec = TINY_PIPELINES[fam.model_type]
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    res = tuple(spec.resolution) if args.smoke else (args.resolution, args.resolution)
    frames = (spec.options.get("num_frames") if args.smoke else args.frames) if fam.video else None
    row: dict[str, Any] = {"model_type": fam.model_type, "checkpoint": "tiny" if args.smoke else fam.checkpoint,
                           "text_encoders": "tiny" if args.smoke else fam.text, "resolution": list(res),
                           "frames": frames, "batch": args.batch, "steps": args.steps, "sde_steps": args.sde_steps,
                           "max_layers": args.max_layers, "status": "error"}
    t0 = time.perf_counter()
    if args.smoke:
        pipe = spec.build(0)  # float32 (smoke measures nothing)
    else:
        pipe = build_real(fam.model_type, device, dtype, args.max_layers)
    options = adapter_options(fam.model_type, args.smoke, frames or 1)
    if not args.smoke and args.dtype:  # the frozen parts too (default: bf16 on CUDA, float32 elsewhere)
        options.update(text_dtype=args.dtype, vae_dtype=args.dtype)
    adapter = MODELS.get(fam.model_type).from_pipeline(pipe, options, device)
    from shared.models.attention import apply_attention_backend

    apply_attention_backend(adapter.transformer, args.attn_backend,  # None: flowrl's default, as trainer and sampler
                            masked=adapter.model_type if adapter.attention_mask else None)
    if args.attn_backend:
        row["attn_backend"] = args.attn_backend
    row["cudnn_attention"] = torch.backends.cuda.cudnn_sdp_enabled()
    synchronize(device)
    row["build_s"] = time.perf_counter() - t0
    row["pipeline_class"] = type(pipe).__name__
    row["transformer_class"] = type(adapter.transformer).__name__
    row["transformer_params_B"] = sum(p.numel() for p in adapter.transformer.parameters()) / 1e9
    frozen = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module) and n != "transformer"}
    row["other_params_M"] = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in frozen.items()}
    row["weights_gib"] = torch.cuda.memory_allocated(device) / 2**30 if cuda else 0.0
    assert isinstance(pipe, getattr(diffusers, spec.pipeline_class))

    b = args.batch
    guidance = spec.guidance_scale if args.smoke else (4.0 if spec.uses_cfg else 3.5)
    row["guidance"] = ("cfg " if spec.uses_cfg else "embedded ") + str(guidance)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
    images = condition_rows(b, fam.condition_images) if fam.condition_images else None
    sde = list(range(args.sde_steps))
    cfg = parse_config({
        "model": {"model_type": fam.model_type, "model_name_or_path": "random-weights", "options": options,
                  "lora_rank": args.lora_rank, "lora_alpha": 2 * args.lora_rank,
                  "gradient_checkpointing": args.gradient_checkpointing},
        "train": {"resolution": list(res), "num_inference_steps": args.steps, "guidance_scale": guidance,
                  "group_size": b, "unique_sample_num_per_epoch": 1, "per_device_batch_size": b,
                  "gradient_step_per_epoch": 1, "learning_rate": 1e-4, "max_epochs": 1,
                  "mixed_precision": "bf16" if cuda else "no"},
        "logging_backend": "none", "rewards": [{"reward_model": "brightness"}]})

    with peak_memory(device) as mem:
        times = []
        for _ in range(args.repeats):
            synchronize(device)
            t = time.perf_counter()
            cond, roll = rollout_batches(
                adapter, prompts, [NEGATIVE] * b, list(range(b)), batch_size=b, resolution=res,
                num_steps=args.steps, guidance_scale=guidance, dynamics="Flow-SDE", noise_level=0.7, sde_steps=sde,
                keep_means=False, log_prob_reduction="mean", transformer=None, num_frames=frames, images=images)
            synchronize(device)
            times.append(time.perf_counter() - t)
        row["rollout_first_s"], row["rollout_s"] = times[0], times[-1]
        media = tuple(roll.images.shape)
        row["media_shape"] = list(media)
        assert media[0] == b and media[-2:] == res, f"rollout media of shape {media}"
        assert torch.isfinite(roll.log_probs).all(), "non-finite rollout log-probs"

        trainable = attach_trainable(adapter, cfg)
        optimizer, _ = build_optimizer(cfg, trainable)
        row["trainable_params_M"] = sum(p.numel() for p in trainable.values()) / 1e6
        x, sigma = roll.latents[:, 0], roll.sigmas[sde[0]].expand(b).to(device)
        adapter.transformer.train()
        times, losses = [], []
        for _ in range(args.repeats):
            synchronize(device)
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                v = adapter.velocity(x, sigma, cond, guidance)
            loss = (v.float() - x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
        adapter.transformer.eval()
        row["train_step_first_s"], row["train_step_s"] = times[0], times[-1]
        row["loss"] = losses[-1]
    row["peak_gib"] = mem["peak_gib"]
    row["status"] = "ok"
    return row


def run_isolated(name: str, argv: list[str] | None, out: Path, timeout: float) -> dict[str, Any]:
    """``name``'s row measured by a child process (this script, ``--families name --no-isolate``,
    the other arguments as given); a child that dies without a row, or runs past ``timeout`` seconds,
    raises with the reason."""
    import subprocess
    import sys

    # the child's --families / --out come last and override the given ones; the parent writes the docs
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--doc"]
    child_out = out.with_name(f"{out.stem}.{name}.json")
    child_out.unlink(missing_ok=True)
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *given, "--families", name,
                               "--no-isolate", "--out", str(child_out)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"the child process for {name} ran past {timeout} s; first error: "
                           f"TimeoutError: no row after {timeout} s") from e
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", flush=True)
    if not child_out.exists():
        output = proc.stdout + proc.stderr
        raise RuntimeError(f"the child process for {name} exited with {proc.returncode} before writing a row; "
                           f"first error: {error_line(output)}\n... {output[-1200:]}")
    rows = json.loads(child_out.read_text())["rows"]
    child_out.unlink()
    if proc.returncode != 0 and rows and rows[0].get("status") == "ok":
        rows[0]["status"], rows[0]["error"] = "error", f"child exited with {proc.returncode} after the row"
    return rows[0]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- docs


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def error_line(text: str) -> str:
    """The first ``SomeError: message`` line of ``text`` (the root cause, before the errors it led
    to), else its last non-empty line."""
    named = re.search(r"first error: (.+)", text)  # a child's error (run_isolated) names it
    if named:
        return named.group(1).strip()
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    causes = [x for x in lines if re.match(r"^[\w.]+(Error|Exception): ", x) and "child process" not in x]
    return causes[0] if causes else (lines[-1] if lines else "")


def doc_table(payloads: list[dict[str, Any]]) -> str:
    """The markdown between the markers: a row per family and result file (device runs), in the
    order of :data:`FAMILIES`; a family no file has is listed as not run."""
    first = payloads[0]
    env = first.get("gpu") or first.get("device", "?")
    lines = [f"Measured on {env} (torch {first.get('torch')}, diffusers {first.get('diffusers')}), "
             f"{first.get('date', '')}: batch {first.get('batch')}, {first.get('steps')} steps "
             f"({first.get('sde_steps')} Flow-SDE), LoRA rank {first.get('lora_rank')}, bf16, "
             f"`bench/gpu/models.py`; rollout and step seconds are the last of each run's repeats.", "",
             "| model type | checkpoint architecture | transformer params | text encoders | resolution / frames "
             "| rollout s | train step s | peak GiB | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, fam in FAMILIES.items():
        found = [(p, r) for p in payloads for r in p.get("rows", []) if r.get("model_type") == name]
        if not found:
            lines.append(f"| `{name}` | {fam.checkpoint} | - | {fam.text} | - | - | - | - | not run |")
        for payload, r in found:
            h, w = r.get("resolution", ["?", "?"])
            rf = f"{h}x{w}" + (f"x{r['frames']}" if r.get("frames") else "") if "resolution" in r else "-"
            status = "ok" if r.get("status") == "ok" else "error: " + error_line(str(r.get("error", "")))[:160]
            notes = ([f"attention `{r['attn_backend']}`"] if r.get("attn_backend") else []) + (
                ["1 repeat (includes CUDA warm-up)"] if payload.get("repeats") == 1 else [])
            status += f" ({'; '.join(notes)})" if notes else ""
            params = r.get("transformer_params_B")
            lines.append(f"| `{name}` | {r.get('checkpoint', fam.checkpoint)} | "
                         f"{'-' if params is None else f'{params:.2f} B'} | {r.get('text_encoders', fam.text)} | "
                         f"{rf} | {_fmt(r.get('rollout_s'), '.2f')} | {_fmt(r.get('train_step_s'), '.2f')} | "
                         f"{_fmt(r.get('peak_gib'), '.1f')} | {status.replace('|', '/')} |")
    return "\n".join(lines)


def write_doc(payloads: dict[str, Any] | list[dict[str, Any]], path: Path = DOC) -> Path:
    """Rewrite the table between the markers of ``docs/models.md`` (device results only)."""
    payloads = payloads if isinstance(payloads, list) else [payloads]
    if any(p.get("smoke") or p.get("device") != "cuda" or p.get("max_layers") for p in payloads):
        raise SystemExit("--doc takes full-size device results only (this payload is a smoke, CPU or "
                         "--max-layers run); "
                         "docs/models.md keeps its table")
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + START + "\n" + doc_table(payloads) + "\n" + END + tail)
    return path


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--smoke", action="store_true", help="tiny pipelines on any device (tests); measures nothing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--frames", type=int, default=5, help="video families")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sde-steps", type=int, default=2, help="leading Flow-SDE steps (log-probs recorded)")
    p.add_argument("--repeats", type=int, default=None, help="rollouts / steps per family (default 2; smoke 1)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="transformer (and frozen parts) dtype; default bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--max-layers", type=int, default=None,
                   help="cap the transformer's block counts: a CPU check of the real widths, not a measurement")
    p.add_argument("--attn-backend", default=None,
                   help="model.attn_backend for every family (default: flowrl's: PyTorch's SDPA, its cuDNN kernel "
                        "off on CUDA)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each family in its own process (default on CUDA: a CUDA error such as an illegal memory "
                        "access poisons the whole process, and the other families must still run)")
    p.add_argument("--family-timeout", type=float, default=240, help="with --isolate: seconds per family")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/gpu_models.json)")
    p.add_argument("--doc", action="store_true", help="rewrite docs/models.md's table from the results (device only)")
    p.add_argument("--from", dest="from_file", nargs="+", default=None,
                   help="with --doc: existing result JSON file(s), run nothing (rows of all of them)")
    args = p.parse_args(argv)
    if args.from_file:
        payloads = [json.loads(Path(f).read_text()) for f in args.from_file]
        if args.doc:
            print(f"wrote {write_doc(payloads)}")
        return payloads[0]
    if args.smoke:
        args.steps, args.sde_steps = 3, 2
    args.repeats = args.repeats or (1 if args.smoke else 2)
    args.model = "models"  # write_result's default name: bench/results/gpu_models.json
    device = torch.device(args.device)
    payload = {"bench": "gpu_models", "smoke": args.smoke, "batch": args.batch, "steps": args.steps,
               "sde_steps": args.sde_steps, "lora_rank": args.lora_rank, "repeats": args.repeats,
               "gradient_checkpointing": args.gradient_checkpointing, "max_layers": args.max_layers,
               "dtype": args.dtype or ("bfloat16" if device.type == "cuda" else "float32"),
               "date": time.strftime("%Y-%m-%d"), "rows": [], **environment(device)}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "gpu_models.json"
    isolate = (device.type == "cuda") if args.isolate is None else args.isolate
    for name in args.families:
        print(f"=== {name}", flush=True)
        try:
            row = run_isolated(name, argv, out, args.family_timeout) if isolate else run_family(FAMILIES[name], args, device)
        except Exception as e:  # noqa: BLE001 -- one family failing must not stop the others
            row = {"model_type": name, "checkpoint": FAMILIES[name].checkpoint, "status": "error",
                   "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
            print(row["traceback"], flush=True)
        free(device)
        payload["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")  # partial results survive a time limit
    write_result("models", argparse.Namespace(out=str(out), model="models"), payload)
    if args.doc:
        print(f"wrote {write_doc(payload)}")
    return payload


if __name__ == "__main__":
    main()
