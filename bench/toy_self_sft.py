"""Does the toy pipeline get better when fine-tuned on its own verified-correct images?

A diagnostic for the toy world's RL (issue 3). DiffusionNFT and AWM regress the velocity field
on the model's own generated images (x0 targets); this probe isolates that ingredient with
rejection sampling (RAFT / best-of-N fine-tuning): each round samples ``--samples-per-prompt``
images (ODE, guidance 1) for ``--prompts`` train prompts drawn from the category-balanced
split, keeps the ones the ``toy_geneval`` verifier passes (with ``exact_objects``), and runs
``--steps`` steps of plain flow-matching loss (uniform sigma, batch ``--batch``) on their latents
with the toy configs' LoRA (rank 16, AdamW at ``--lr``), keeping an EMA of the LoRA weights
(``--ema``, 0 = none). After every round: held-out accuracy (GenEval's rule, 47 test prompts x
``--eval-seeds`` seeds, 10 ODE steps, guidance 1) of the trained weights and of the EMA.

    python bench/toy_self_sft.py --rounds 2 --steps 20 --lr 5e-4     # ~4 min on 2 CPU cores

Writes ``bench/results/toy_self_sft_cpu.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import load_config  # noqa: E402
from shared.models import load_adapter  # noqa: E402
from shared.rewards.toy_geneval import ToyGenEval  # noqa: E402
from shared.sampling import rollout_batches  # noqa: E402
from shared.toy.scenes import CATEGORIES, balanced, prompt_text, split  # noqa: E402
from trainer.ema import EMA  # noqa: E402
from trainer.policy import attach_trainable  # noqa: E402


def sample(adapter, transformer, prompts: list[str], seeds: list[int], steps: int, guidance: float = 1.0):
    """ODE rollout (guidance 1 unless given): (conditioning, rollout); ``rollout.images`` in [0, 1]."""
    transformer.eval()
    with torch.no_grad():
        return rollout_batches(
            adapter, prompts, [None] * len(prompts), seeds, batch_size=128, resolution=64,
            num_steps=steps, guidance_scale=guidance, dynamics="ODE", noise_level=0.0, sde_steps=[],
            keep_means=False, log_prob_reduction="mean", transformer=transformer)


def heldout(adapter, transformer, seeds: int) -> dict:
    """GenEval's overall held-out accuracy and each category's, as ``flowrl eval`` reports them
    (the ``toy_geneval`` reward's ``details`` and ``summarize_details``)."""
    prompts = [prompt_text(s) for s in split()[1] for _ in range(seeds)]
    _, roll = sample(adapter, transformer, prompts, list(range(len(prompts))), 10)
    reward = ToyGenEval()
    details = reward.details(roll.images, prompts)
    means = {c: float(details[f"accuracy/{c}"].nanmean()) for c in CATEGORIES}
    means = {c: v for c, v in means.items() if not math.isnan(v)}
    overall = reward.summarize_details({f"accuracy/{c}": v for c, v in means.items()})["accuracy"]
    return {"accuracy": round(overall, 4), "categories": {c: round(v, 4) for c, v in means.items()}}


def fm_loss(adapter, transformer, x0: torch.Tensor, cond: dict[str, torch.Tensor],
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain flow-matching loss on clean latents ``x0 [B, ...]``: uniform ``sigma [B]``,
    ``x_t = (1 - sigma) x0 + sigma eps``, target ``eps - x0``; ``cond`` holds ``B`` rows."""
    sigma = torch.rand(x0.shape[0], generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    s = sigma.view(-1, *[1] * (x0.dim() - 1))
    v = adapter.predict(transformer, (1 - s) * x0 + s * eps, sigma, cond).float()
    return ((v - (eps - x0)) ** 2).mean()


def write_json(path: str | Path, result: dict) -> Path:
    """``result`` as indented JSON at ``path`` (folders made); prints where it went."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return out


@contextmanager
def swapped(params: dict, ema: EMA):
    """``params`` hold the EMA's shadow inside the block, their own values again after it."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    ema.copy_to(params)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=96, help="train prompts per round")
    ap.add_argument("--samples-per-prompt", type=int, default=8)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per round")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.0)
    ap.add_argument("--eval-seeds", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "toy_self_sft_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    cfg = load_config(ROOT / "examples" / "toy" / "nft_10min.yaml")
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=args.seed)
    params = attach_trainable(adapter, cfg)
    transformer = adapter.transformer
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=1e-4)
    ema = EMA(params)
    train_specs = balanced(split()[0])

    result = {"args": vars(args), "platform": platform.machine(), "torch": torch.__version__,
              "base": heldout(adapter, transformer, args.eval_seeds), "rounds": []}
    print("base", result["base"], flush=True)
    train_seconds = 0.0
    for r in range(args.rounds):
        t0 = time.time()
        prompts = [prompt_text(s) for s in rng.sample(train_specs, args.prompts)
                   for _ in range(args.samples_per_prompt)]
        seeds = [100_000 * (r + 1) + i for i in range(len(prompts))]
        cond, roll = sample(adapter, transformer, prompts, seeds, args.sample_steps)
        passed = ToyGenEval(strict=True, exact_objects=True).score(roll.images, prompts)
        kept = passed.nonzero().flatten().tolist()
        if not kept:
            raise RuntimeError(f"round {r}: no sample passed the verifier; nothing to fine-tune on")
        x0 = roll.final_latents[kept]
        tensors = {k: v[kept] for k, v in cond.tensors.items()}
        transformer.train()
        losses = []
        for _ in range(args.steps):
            idx = torch.randint(len(kept), (args.batch,))
            loss = fm_loss(adapter, transformer, x0[idx], {k: t[idx] for k, t in tensors.items()})
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimizer.step()
            losses.append(loss.item())
            if args.ema:
                ema.update(params, args.ema)
        train_seconds += time.time() - t0
        row = {"round": r, "kept": len(kept), "sampled": len(prompts), "loss_first": round(losses[0], 4),
               "loss_last": round(losses[-1], 4), "train_seconds": round(train_seconds, 1),
               "heldout": heldout(adapter, transformer, args.eval_seeds)}
        if args.ema:
            with swapped(params, ema):
                row["heldout_ema"] = heldout(adapter, transformer, args.eval_seeds)
        result["rounds"].append(row)
        print(json.dumps(row), flush=True)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
