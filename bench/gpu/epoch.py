"""(c, d) One full training epoch of the peer's SD3.5-M LoRA recipe, through flowrl's own trainer
(``trainer.loop.train``), split into sampling / training / the rest, with peak memory.

    python bench/gpu/epoch.py --algorithm grpo --epochs 4       # (c)
    python bench/gpu/epoch.py --algorithm nft --epochs 4        # (d), also awm

The recipe (issue 8, the peer's SD3.5-M LoRA GRPO scaled to one GPU): 6 prompts x group 24 =
144 images per epoch at 512 px, micro-batch 8, 10 steps, CFG 4.5 in sampling and training,
Flow-SDE with 2 trained SDE steps, LoRA r=32 alpha 64 on the 8 attention projections of both
streams, bf16, 2 AdamW steps per epoch, no gradient checkpointing. nft / awm keep that geometry
with their algorithm defaults (ODE rollouts, 2 training timesteps).

The pipeline is saved first (``--workdir``) and loaded by the trainer as any model would be: the
real-size random-weight SD3.5-M transformer and SD3 VAE (``common.py``), two one-layer CLIP text
encoders of the real widths (768 / 1280) with a locally built tokenizer, no T5 (its 256 tokens
are zeros, as the pipeline does without one; the transformer still sees 77 + 256 tokens). Text
encoding happens once (the embedding cache) and is outside the timed epochs. The reward is the
weight-free ``brightness`` (the peer's PickScore took 2.2 s of its 62.3 s). ``epoch_s`` is the
median of the epochs after the first (steady state; the first includes warm-up), ``peak_gib``
the CUDA allocator's peak over the run.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import tempfile
from pathlib import Path

import torch

from common import base_parser, build_adapter, environment, write_result  # noqa: I001

from shared.config import parse_config  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
PROMPTS = [f"a photo of a {c} {o} on a {s}" for c in ("red", "green", "blue", "yellow")
           for o in ("cat", "car", "chair", "cup") for s in ("table", "street", "beach")]


def save_pipeline(directory: Path, *, smoke: bool, device: torch.device) -> Path:
    """The benchmark pipeline (module docstring) saved with ``save_pretrained``."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from shared.toy.pipeline import build_tokenizer

    adapter = build_adapter("sd3-5", smoke=smoke, device=device, dtype=torch.bfloat16 if device.type == "cuda"
                            else torch.float32)
    tokenizer = build_tokenizer(directory / "_tokenizer", corpus=PROMPTS * 4, vocab_size=400)
    widths = ((16, 16), (16, 16)) if smoke else ((768, 768), (1280, 1280))  # (hidden, projection): CLIP-L, CLIP-G
    encoders = []
    for hidden, projection in widths:
        cfg = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, hidden_size=hidden,
                             intermediate_size=4 * hidden, num_attention_heads=max(1, hidden // 64),
                             num_hidden_layers=1, projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        encoders.append(CLIPTextModelWithProjection(cfg).to(device))
    pipe = adapter.pipeline
    full = StableDiffusion3Pipeline(transformer=pipe.transformer, scheduler=pipe.scheduler, vae=pipe.vae,
                                    text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    full.save_pretrained(directory / "pipe")
    return directory / "pipe"


def recipe(args, pipe: Path, data: Path, out: Path) -> dict:
    train = {"trainer_type": args.algorithm, "resolution": args.resolution, "num_inference_steps": args.steps,
             "guidance_scale": 4.5, "group_size": args.group_size, "unique_sample_num_per_epoch": args.prompts,
             "per_device_batch_size": args.batch, "rollout_batch_size": args.rollout_batch,
             "gradient_step_per_epoch": 2, "learning_rate": 3e-4,
             "mixed_precision": "bf16" if args.device == "cuda" else "no", "max_epochs": args.epochs, "seed": 42}
    if args.algorithm == "grpo":
        window = [0, 1] if args.smoke else [1, 2, 3, 4, 5]  # 2 of the window's steps per epoch
        train.update(dynamics_type="Flow-SDE", noise_level=0.7, train_steps=window, num_train_steps=2,
                     clip_range=1e-4, kl_beta=0)
    else:
        train.update(num_train_timesteps=2)
    smoke_model = {"lora_rank": 4, "lora_alpha": 8} if args.smoke else {"lora_rank": 32, "lora_alpha": 64}
    return {"output_dir": str(out), "run_name": f"bench_{args.algorithm}", "logging_backend": "none",
            "model": {"model_type": "sd3-5", "model_name_or_path": str(pipe), "target_modules": TARGETS,
                      "options": {"max_sequence_length": 256 if not args.smoke else 8}, **smoke_model,
                      **({"compile": args.compile} if args.compile else {}), "attn_backend": args.attn_backend},
            "data": {"dataset_dir": str(data)}, "train": train,
            "eval": {"eval_freq": 0, "num_prompts": 1, "num_inference_steps": 2},
            "rewards": [{"reward_model": "brightness"}]}


class _Stopped(Exception):
    """SIGTERM (a time limit) arrived during training."""


def _stop(signum, frame):
    raise _Stopped()


def main(argv=None) -> dict:
    from trainer.loop import train

    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--algorithm", default="grpo", choices=["grpo", "nft", "awm"])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--group-size", type=int, default=24)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rollout-batch", type=int, default=None,
                   help="train.rollout_batch_size (default: the micro-batch --batch, as the recipe)")
    p.add_argument("--workdir", default=None, help="where the pipeline and the run go (default: a temp dir); "
                                                   "a pipeline saved there by an earlier run is reused")
    args = p.parse_args(argv)
    if args.model != "sd3-5":
        raise SystemExit("epoch.py runs the SD3.5-M recipe (--model sd3-5)")
    if args.smoke:
        args.resolution, args.steps, args.prompts, args.group_size, args.batch = 64, 3, 2, 4, 4
        args.epochs = min(args.epochs, 2)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        pipe = work / "pipe"
        if not (pipe / "model_index.json").exists():  # a --workdir kept from an earlier run is reused
            pipe = save_pipeline(work, smoke=args.smoke, device=device)
        data = work / "data"
        data.mkdir(parents=True, exist_ok=True)
        (data / "train.txt").write_text("\n".join(PROMPTS) + "\n")
        runs = work / f"runs-{os.getpid()}"  # never an earlier run's directory (no resuming)
        cfg = parse_config(recipe(args, pipe, data, runs))
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        signal.signal(signal.SIGTERM, _stop)  # `timeout` (run_device.sh): keep the epochs that finished
        try:
            summary, stopped = train(cfg, quiet=True), False
        except _Stopped:
            summary, stopped = {"samples": None}, True
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        metrics = runs / f"bench_{args.algorithm}" / "metrics.jsonl"
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    epochs = [r for r in rows if "time/epoch_seconds" in r]
    steady = epochs[1:] or epochs
    med = lambda key: statistics.median(r[key] for r in steady) if steady and key in steady[0] else None  # noqa: E731
    epoch_s, sample_s, train_s = med("time/epoch_seconds"), med("time/sample_seconds"), med("time/optimize_seconds")
    payload = {"bench": "gpu_epoch", "model": "sd3-5", "algorithm": args.algorithm, "smoke": args.smoke,
               "compile": args.compile,
               "images_per_epoch": args.prompts * args.group_size, "resolution": args.resolution, "steps": args.steps,
               "batch": args.batch, "rollout_batch": args.rollout_batch or args.batch, "epochs": len(epochs),
               "epoch_s": epoch_s, "sample_s": sample_s, "train_s": train_s,
               "other_s": None if epoch_s is None else epoch_s - (sample_s or 0) - (train_s or 0),
               "first_epoch_s": epochs[0]["time/epoch_seconds"] if epochs else None, "peak_gib": peak,
               "per_epoch": [{k: r[k] for k in r if k.startswith("time/")} for r in epochs],
               "samples": summary["samples"], "stopped_by_time_limit": stopped, **environment(device)}
    print(f"{args.algorithm}: {len(epochs)} epochs{' (stopped by the time limit)' if stopped else ''}, steady epoch "
          f"{epoch_s} s (sample {sample_s}, train {train_s}), peak {peak:.1f} GiB", flush=True)
    suffix = ("_compiled" if args.compile else "") + (f"_rb{args.rollout_batch}" if args.rollout_batch else "")
    write_result(f"epoch_{args.algorithm}{suffix}", args, payload)
    return payload


if __name__ == "__main__":
    main()
