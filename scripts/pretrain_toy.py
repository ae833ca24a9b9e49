"""Pretrain the toy SD3 pipeline on procedurally generated scenes (``shared.toy``).

Reproducible from ``--seed`` (same torch build and thread count). Three stages:

1. a CLIP-style BPE tokenizer on the toy prompt corpus, and a random toy
   ``StableDiffusion3Pipeline`` (``shared.toy.pipeline``);
2. the VAE as an autoencoder on rendered training scenes (MSE + L1 + a small KL), then its
   ``shift_factor`` / ``scaling_factor`` set from the latent statistics, as SD3's are;
3. the transformer and both text encoders jointly with the rectified-flow loss
   (``x_t = (1 - t) x0 + t eps``, target ``eps - x0``, logit-normal ``t``, the prompt dropped
   to "" 10% of the time so CFG works), EMA of the weights.

Every ``--eval-every`` steps the EMA model samples the held-out test prompts (ODE, fixed
seeds, ``--eval-steps``, ``--guidance``) and the ``toy_geneval`` verifier scores them. The run
stops at the first evaluation whose held-out accuracy reaches ``--target`` (the toy must be
decent but imperfect so RL has room) or after ``--dit-steps``, and saves the EMA pipeline with
``save_pretrained`` plus ``pretrain.json`` (arguments, accuracy curve, timings).

How the shipped ``assets/toy-sd3`` was made (2 CPU cores, torch 2.13 CPU, ~42 min in all;
``pretrain.json`` keeps both records, the first under ``init``)::

    # phase 1: tokenizer, VAE, then 4000 DiT steps at lr 1e-3 (evaluated without CFG)
    python scripts/pretrain_toy.py --out runs/pretrain_toy/phase1 --threads 2 --eval-every 200 --guidance 1.0
    # phase 2: 3000 more steps, lr 3e-4 / 1e-4 decayed linearly to 0, evaluated with CFG 4.5
    python scripts/pretrain_toy.py --init runs/pretrain_toy/phase1 --out assets/toy-sd3 --threads 2 \
        --eval-every 250 --dit-steps 3000 --lr 3e-4 --text-lr 1e-4 --lr-decay --guidance 4.5 --target 0.40

Evaluation never touches the training random streams, so ``--eval-every`` does not change
the weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.models.sd3 import SD3Adapter  # noqa: E402
from shared.rewards.builtin import to_uint8_hwc  # noqa: E402
from shared.sampling import rollout  # noqa: E402
from shared.toy.pipeline import TOY_SIZES, build_tokenizer, build_toy_pipeline, save_toy_pipeline, toy_sizes  # noqa: E402
from shared.toy.scenes import CATEGORIES, prompt_text, split, training_pairs  # noqa: E402
from shared.toy.verify import verify  # noqa: E402
from trainer.reporting import save_grid  # noqa: E402
from trainer.timesteps import logit_normal_draws  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="assets/toy-sd3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--caption-noise", type=float, default=0.0,
                   help="fraction of training images that show a miscaptioned scene (shared.toy.scenes.miscaptioned)")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--dit-steps", type=int, default=4000)
    p.add_argument("--dit-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--text-lr", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--target", type=float, default=0.45)
    p.add_argument("--init", default=None,
                   help="continue from a pipeline this script saved (skips stage 1; its record is kept)")
    p.add_argument("--lr-decay", action="store_true", help="decay the learning rates linearly to 0")
    p.add_argument("--t-logit-mean", type=float, default=0.0,
                   help="training noise levels t = sigmoid(N(mean, std)) (SD3's logit-normal); a positive "
                        "mean trains the noisier levels, where the layout is decided, more often")
    p.add_argument("--t-logit-std", type=float, default=1.0)
    p.add_argument("--workdir", default="runs/pretrain_toy",
                   help="stage-1 pipeline (tokenizer + VAE, reused when present), eval grids, snapshots")
    p.add_argument("--text-width", type=int, default=64,
                   help="width of both text encoders (multiple of 32; the shipped toy: 64); a fresh run only")
    p.add_argument("--text-layers", type=int, default=2,
                   help="layers of both text encoders (the shipped toy: 2); a fresh run only")
    p.add_argument("--dit-layers", type=int, default=4,
                   help="joint blocks of the MMDiT (the shipped toy: 4; ~2.4 MB each in float32, and the "
                        "saved pipeline must stay under 25 MB); a fresh run only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args(argv)
    if not args.t_logit_std > 0:
        p.error(f"--t-logit-std must be > 0 (the spread of logit(t); SD3 uses 1.0), got {args.t_logit_std}")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_data(n: int, seed: int, caption_noise: float = 0.0) -> tuple[list[str], torch.Tensor]:
    prompts, images = [], []
    for prompt, image in training_pairs(n, seed, caption_noise):
        prompts.append(prompt)
        images.append(image)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # uint8 [N,3,64,64]
    return prompts, x


def noise_levels(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """``[n]`` rectified-flow training times ``t = sigmoid(mean + std * z)``, ``z ~ N(0, 1)`` from
    ``generator`` (t = 1 is pure noise). The defaults are SD3's logit-normal and draw exactly the
    stream this script always drew; ``median(t) = sigmoid(mean)``."""
    return logit_normal_draws(n, generator, mean, std)


def to_unit(x_u8: torch.Tensor, device) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float [-1, 1] on ``device``."""
    return x_u8.to(device).float() / 127.5 - 1.0


def train_vae(vae, images, args, g: torch.Generator) -> list[float]:
    device = args.device
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.vae_steps, pct_start=0.05)
    losses = []
    for step in range(args.vae_steps):
        idx = torch.randint(len(images), (args.vae_batch,), generator=g)
        x = to_unit(images[idx], device)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=None)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step:5d} loss {np.mean(losses[-100:]):.4f}")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_all(vae, images, device, batch=256) -> torch.Tensor:
    out = [vae.encode(to_unit(images[i:i + batch], device)).latent_dist.mean
           for i in range(0, len(images), batch)]
    return torch.cat(out)


@torch.no_grad()
def held_out_accuracy(adapter, transformer, prompts, args, grid: Path | None = None) -> dict:
    """ODE samples of every prompt (seed = index), scored by the verifier; optional image grid."""
    sigmas = adapter.sigmas(args.eval_steps, (64, 64))  # the grid rollouts use
    verdicts, shown = [], []
    for i in range(0, len(prompts), 64):
        chunk = prompts[i:i + 64]
        cond = adapter.encode_prompts(chunk, cfg=args.guidance > 1.0)
        roll = rollout(adapter, cond, list(range(i, i + len(chunk))), resolution=(64, 64),
                       sigmas=sigmas, guidance_scale=args.guidance, dynamics="ODE",
                       noise_level=0.0, sde_steps=[], transformer=transformer)
        verdicts += [verify(img, p) for img, p in zip(to_uint8_hwc(roll.images), chunk)]
        shown.append(roll.images.cpu())
    if grid is not None:
        save_grid(torch.cat(shown)[:48], grid, nrow=8)
    out = {"accuracy": float(np.mean([v.correct for v in verdicts])),
           "score": float(np.mean([v.score for v in verdicts]))}
    for c in CATEGORIES:
        mine = [v.correct for v in verdicts if v.category == c]
        if mine:
            out[f"accuracy/{c}"] = float(np.mean(mine))
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    sizes = toy_sizes(args.text_width, args.text_layers, args.dit_layers)
    custom_sizes = sizes != TOY_SIZES
    if args.init and custom_sizes:
        raise SystemExit("pretrain_toy: --text-width/--text-layers/--dit-layers size a fresh pipeline; --init "
                         "continues one whose text encoders and transformer are already sized. Drop one of them.")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    t_start = time.time()
    timings = {}

    work = Path(args.workdir)
    stage1 = work / f"stage1-seed{args.seed}-n{args.num_images}-vae{args.vae_steps}x{args.vae_batch}"
    if custom_sizes:  # the stage-1 pipeline holds the (untrained) text encoders and transformer too
        stage1 = stage1.with_name(f"{stage1.name}-text{args.text_width}x{args.text_layers}"
                                  + (f"-dit{args.dit_layers}"
                                     if args.dit_layers != TOY_SIZES["transformer"]["num_layers"] else ""))

    t0 = time.time()
    prompts, images = make_data(args.num_images, args.seed, args.caption_noise)
    timings["data_s"] = time.time() - t0
    log(f"{len(prompts)} training scenes in {timings['data_s']:.1f}s")

    t0 = time.time()
    source = Path(args.init) if args.init else stage1
    if (source / "model_index.json").is_file():  # tokenizer + VAE (+ more) of an earlier run
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(source, text_encoder_3=None, tokenizer_3=None,
                                                        image_encoder=None, feature_extractor=None)
        pipe.to(args.device)
        vae_losses = json.loads((stage1 / "vae_losses.json").read_text()) if not args.init else []
        for _ in range(args.vae_steps):  # keep the generator where a full run would have it
            torch.randint(len(images), (args.vae_batch,), generator=g)
        log(f"stage 1 (tokenizer, VAE{', transformer, text encoders' if args.init else ''}) loaded from {source}")
        if args.init:  # the record names the text encoders the continued pipeline has
            args.text_width = pipe.text_encoder.config.hidden_size
            args.text_layers = pipe.text_encoder.config.num_hidden_layers
            args.dit_layers = pipe.transformer.config.num_layers
    else:
        tok_dir = work / "tokenizer-tmp"
        build_tokenizer(tok_dir)
        pipe = build_toy_pipeline(sizes, seed=args.seed, tokenizer_dir=tok_dir)
        pipe.to(args.device)
        vae_losses = train_vae(pipe.vae, images, args, g)
        stage1.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(stage1)
        (stage1 / "vae_losses.json").write_text(json.dumps(vae_losses))
    latents = encode_all(pipe.vae, images, args.device)
    shift = latents.mean().item()
    scale = 1.0 / (latents - shift).std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    x0_all = ((latents - shift) * scale).cpu()
    timings["vae_s"] = time.time() - t0
    log(f"vae done in {timings['vae_s']:.0f}s; shift {shift:.4f} scale {scale:.4f}")

    adapter = SD3Adapter.from_pipeline(pipe, {"max_sequence_length": 0}, args.device)
    transformer, te1, te2 = pipe.transformer, pipe.text_encoder, pipe.text_encoder_2
    trainables = [transformer, te1, te2]
    for m in trainables:
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW([
        {"params": transformer.parameters(), "lr": args.lr},
        {"params": list(te1.parameters()) + list(te2.parameters()), "lr": args.text_lr},
    ], weight_decay=0.01)
    warmup = 200
    lr_factor = (lambda s: max(0.0, 1 - s / args.dit_steps)) if args.lr_decay else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * lr_factor(s))
    ema = [copy.deepcopy(m).requires_grad_(False).eval() for m in trainables]

    train_specs, test_specs = split()
    test_prompts = [prompt_text(s) for s in test_specs]
    train_probe = [prompt_text(s) for s in train_specs[::3]]  # seen prompts, for comparison
    curve, losses = [], []
    t0 = time.time()
    stopped_at = args.dit_steps
    for step in range(1, args.dit_steps + 1):
        idx = torch.randint(len(prompts), (args.dit_batch,), generator=g)
        batch_prompts = [prompts[i] if torch.rand((), generator=g) > 0.1 else "" for i in idx.tolist()]
        pe, _, pooled, _ = pipe.encode_prompt(batch_prompts, None, None, device=args.device,
                                              do_classifier_free_guidance=False, max_sequence_length=0)
        x0 = x0_all[idx].to(args.device)
        eps = torch.randn(x0.shape, generator=g).to(args.device)
        t = noise_levels(len(idx), g, args.t_logit_mean, args.t_logit_std).to(args.device)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        v = transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=pe,
                        pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(v.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in trainables for p in m.parameters()], 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for live, shadow in zip(trainables, ema):
                for p, q in zip(live.parameters(), shadow.parameters()):
                    q.lerp_(p, 1 - decay)
        if step % 50 == 0:
            log(f"dit step {step:5d} loss {np.mean(losses[-50:]):.4f} ({(time.time() - t0) / step:.2f}s/step)")
        if step % args.eval_every == 0 or step == args.dit_steps:
            # evaluate the EMA weights through the pipeline's own modules
            live_state = [m.state_dict() for m in trainables]
            for live, shadow in zip(trainables, ema):
                live.load_state_dict(shadow.state_dict())
            acc = held_out_accuracy(adapter, transformer, test_prompts, args,
                                    grid=work / f"eval_step{step:05d}.png")
            acc["train_prompt_accuracy"] = held_out_accuracy(adapter, transformer, train_probe, args)["accuracy"]
            acc.update(step=step, seconds=round(time.time() - t0, 1), loss=float(np.mean(losses[-args.eval_every:])))
            curve.append(acc)
            log("eval " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in acc.items()}))
            pipe.save_pretrained(work / "snapshot")  # the EMA weights, for inspection
            if acc["accuracy"] >= args.target or step == args.dit_steps:
                stopped_at = step
                break  # EMA weights stay loaded: they are what we save
            for live, state in zip(trainables, live_state):
                live.load_state_dict(state)
    timings["dit_s"] = time.time() - t0

    pipe.to("cpu")
    for m in trainables:
        m.eval().requires_grad_(False)
    save_toy_pipeline(pipe, out)
    report = {
        "args": vars(args), "stopped_at_step": stopped_at, "final": curve[-1] if curve else None,
        "curve": curve, "vae_final_loss": float(np.mean(vae_losses[-100:])) if vae_losses else None,
        "init": json.loads((Path(args.init) / "pretrain.json").read_text()) if args.init else None,
        "vae_shift_factor": shift, "vae_scaling_factor": scale,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.time() - t_start, 1), "torch": torch.__version__,
        "parameters": {k: sum(p.numel() for p in getattr(pipe, k).parameters())
                       for k in ("transformer", "vae", "text_encoder", "text_encoder_2")},
    }
    (out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"saved {out} (held-out accuracy {report['final']['accuracy'] if curve else float('nan'):.3f}, "
        f"{report['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
