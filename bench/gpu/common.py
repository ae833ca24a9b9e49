"""Shared parts of the GPU benchmarks (``bench/gpu/*.py``): real-size random-weight models,
timing, memory, result files.

Models: the SD3.5-Medium and FLUX.1-dev transformer architectures (their ``config.json``), the
SD3 / FLUX VAE, random weights (speed does not depend on the values), wrapped by flowrl's own
adapters (``sd3-5``, ``flux1``) through diffusers' pipeline classes. The text encoders are left
out: a training run encodes every prompt once (``shared.embedding_cache``) and then feeds cached
embeddings, so the benchmarks feed random embeddings of the real shapes (SD3.5: 77 CLIP + 256 T5
tokens of width 4096 and a 2048-wide pooled vector; FLUX.1: 512 T5 tokens and a 768-wide pooled
vector), the same ``Conditioning`` the trainer builds from its cache.

``--smoke`` everywhere builds miniatures of the same classes so the scripts run on a CPU in
seconds (the test suite runs them that way); smoke numbers measure nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.models import Conditioning  # noqa: E402

#: the prompt-embedding shapes fed to each model: (tokens, width, pooled width)
TEXT = {"sd3-5": (333, 4096, 2048), "flux1": (512, 4096, 768)}
TEXT_SMOKE = {"sd3-5": (12, 32, 32), "flux1": (12, 32, 16)}


def sd35m_transformer_config(smoke: bool) -> dict[str, Any]:
    """``stabilityai/stable-diffusion-3.5-medium`` ``transformer/config.json`` (2.24 B parameters,
    MMDiT-X: dual attention in layers 0-12, RMS qk-norm); ``smoke``: two small layers."""
    if smoke:
        return dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                    pooled_projection_dim=32, out_channels=16, pos_embed_max_size=32,
                    dual_attention_layers=(0,), qk_norm="rms_norm")
    return dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def flux1_transformer_config(smoke: bool) -> dict[str, Any]:
    """``black-forest-labs/FLUX.1-dev`` ``transformer/config.json`` (11.9 B parameters, 19 double
    + 38 single blocks, guidance embedding); ``smoke``: one of each, small."""
    if smoke:
        return dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                    guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def vae_config(smoke: bool, model: str) -> dict[str, Any]:
    """The SD3 / FLUX.1 VAE (16 latent channels, 8x; 84 M parameters); ``smoke``: 2 small levels."""
    scale, shift = (1.5305, 0.0609) if model == "sd3-5" else (0.3611, 0.1159)
    common = dict(in_channels=3, out_channels=3, latent_channels=16, act_fn="silu", scaling_factor=scale,
                  shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
    if smoke:
        return dict(common, block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4)
    return dict(common, block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, norm_num_groups=32)


def materialize(cls_name: str, config: dict[str, Any], device: torch.device, dtype: torch.dtype):
    """``cls(**config)`` with its parameters created on the meta device and then allocated on
    ``device`` in ``dtype`` with random values (norm weights 1, biases 0, others N(0, 1/fan_in));
    buffers (RoPE tables) are computed as usual, then moved and cast like ``from_pretrained`` does."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = getattr(diffusers, cls_name)(**config)
    g = torch.Generator(device=device).manual_seed(0)
    for module_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            t = torch.empty(p.shape, device=device, dtype=dtype)
            if p.ndim <= 1:
                t.fill_(0.0 if name == "bias" else 1.0)
            else:
                t.normal_(0.0, 1.0 / math.sqrt(max(1, math.prod(p.shape[1:]))), generator=g)
            setattr(module, name, torch.nn.Parameter(t, requires_grad=False))
    return model.to(device=device, dtype=dtype).eval()


def build_adapter(model: str, *, smoke: bool, device: torch.device, dtype: torch.dtype):
    """flowrl's adapter (``sd3-5`` or ``flux1``) over a diffusers pipeline with the real-size
    random-weight transformer and VAE and no text encoders (prompts come as embeddings)."""
    import diffusers

    from shared.models import MODELS

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**vae_config(smoke, model))
    if model == "sd3-5":
        transformer = materialize("SD3Transformer2DModel", sd35m_transformer_config(smoke), device, dtype)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                                  text_encoder=None, tokenizer=None, text_encoder_2=None,
                                                  tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        options = {"max_sequence_length": 256}
    elif model == "flux1":
        transformer = materialize("FluxTransformer2DModel", flux1_transformer_config(smoke), device, dtype)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)
        pipe = diffusers.FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None,
                                      tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        options = {"shift_resolution": 64 if smoke else 512}
    else:
        raise ValueError(f"--model {model!r}: the GPU benchmarks cover sd3-5 and flux1")
    vae.to(device=device, dtype=dtype if device.type == "cuda" else torch.float32)
    return MODELS.get(model).from_pipeline(pipe, {**options, "vae_dtype": "bfloat16" if device.type == "cuda"
                                                  else "float32"}, device=device)


def conditioning(model: str, batch: int, *, cfg: bool, smoke: bool, device: torch.device,
                 dtype: torch.dtype, seed: int = 0) -> Conditioning:
    """Random prompt embeddings of the model's real shapes (``cfg``: with a negative branch)."""
    tokens, width, pooled = (TEXT_SMOKE if smoke else TEXT)[model]
    g = torch.Generator().manual_seed(seed)

    def one() -> dict[str, torch.Tensor]:
        return {"prompt_embeds": torch.randn(batch, tokens, width, generator=g).to(device, dtype),
                "pooled": torch.randn(batch, pooled, generator=g).to(device, dtype)}

    return Conditioning(one(), one() if cfg else None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, *, iters: int, warmup: int) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` calls (the device drained around it)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / iters


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """``{"peak_gib": ...}`` filled at exit: the CUDA allocator's peak inside the block (0 on CPU)."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield out
    finally:
        synchronize(device)
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def captured_call(module: torch.nn.Module, run: Callable[[], Any]) -> tuple[tuple, dict]:
    """The positional and keyword arguments ``run()`` passes to ``module`` (its first call): what
    the transformer-only limit is timed with, the same forward batch the adapter builds."""
    seen: list[tuple[tuple, dict]] = []
    handle = module.register_forward_pre_hook(lambda m, a, kw: seen.append((a, dict(kw))) if not seen else None,
                                              with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "device": device.type, "cudnn_attention": torch.backends.cuda.cudnn_sdp_enabled()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="sd3-5", choices=sorted(TEXT))
    p.add_argument("--smoke", action="store_true", help="miniature models on any device (tests); measures nothing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", default=None, choices=[None, "default", "max-autotune-no-cudagraphs"],
                   help="torch.compile the transformer (both for the limit and for flowrl)")
    p.add_argument("--attn-backend", default=None,
                   help="model.attn_backend (default: flowrl's, PyTorch's SDPA with its cuDNN kernel off on CUDA)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="result JSON (default bench/results/gpu_<name>_<model>.json)")
    return p


def write_result(name: str, args: argparse.Namespace, payload: dict[str, Any], *, quiet: bool = False) -> Path:
    """Write ``payload`` to ``--out`` (default ``bench/results/gpu_<name>_<model>.json``) and print it
    (``quiet``: a partial result written along the way, not printed)."""
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu_{name}_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    if not quiet:
        print(json.dumps(payload))
    return out
