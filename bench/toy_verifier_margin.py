"""How far are the toy pipeline's correct images from the verifier's edge?

A diagnostic for the toy world's RL (issue 3). If a verifier-passed image fails again after a
tiny change of its latent, the reward an RL run sees for nearly the same image flips between
0 and 1: rendering noise, not composition, decides it, and every update chases that noise.
Two measurements on a toy pipeline (``--model``):

* **perturbation**: ODE samples (10 steps, guidance 1) of the held-out test prompts x
  ``--seeds``; for every sample that passes (GenEval's checks), ``--repeats`` copies of its
  final latent with Gaussian noise of each ``--noise`` std added are decoded and verified; the
  fraction that still pass, per noise level (latents are unit-variance, so 0.05 is 5% of
  their spread);
* **memorization**: for ``--memorize-prompt``, one verifier-passed sample becomes the only
  training image of ``--memorize-steps`` LoRA steps (the toy configs' rank 16, AdamW
  ``--memorize-lr``, plain flow-matching loss, batch 32); then 16 new seeds are sampled: their
  mean squared latent distance to the memorized image and their pass rate (a model that draws
  one correct image almost exactly should pass almost always).

    python bench/toy_verifier_margin.py                       # ~2 min on 2 CPU cores
    python bench/toy_verifier_margin.py --model runs/toy-sd3-v2 --out /tmp/v2.json

Writes ``bench/results/toy_verifier_margin_cpu.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from shared.config import load_config  # noqa: E402
from shared.models import load_adapter  # noqa: E402
from shared.rewards.toy_geneval import ToyGenEval  # noqa: E402
from shared.toy.scenes import prompt_text, split  # noqa: E402
from toy_self_sft import fm_loss, sample, write_json  # noqa: E402
from trainer.policy import attach_trainable  # noqa: E402


def passes(adapter, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``[B]`` bool: GenEval's checks pass on the decoded ``latents``."""
    with torch.no_grad():
        images = adapter.decode(latents)
    return ToyGenEval(strict=True).score(images, prompts) > 0.5


def perturbation(adapter, seeds: int, noise: list[float], repeats: int, gen: torch.Generator) -> dict:
    prompts = [prompt_text(s) for s in split()[1] for _ in range(seeds)]
    _, roll = sample(adapter, adapter.transformer, prompts, list(range(len(prompts))), 10)
    ok = passes(adapter, roll.final_latents, prompts)
    kept = ok.nonzero().flatten().tolist()
    x0 = roll.final_latents[kept]
    out = {"samples": len(prompts), "passed": len(kept), "retained": {}}
    for std in noise:
        hits = 0
        for _ in range(repeats):
            noisy = x0 + std * torch.randn(x0.shape, generator=gen)
            hits += int(passes(adapter, noisy, [prompts[i] for i in kept]).sum())
        out["retained"][str(std)] = round(hits / (repeats * max(1, len(kept))), 4)
    return out


def memorization(adapter, cfg, prompt: str, steps: int, lr: float, gen: torch.Generator) -> dict:
    transformer = adapter.transformer
    params = attach_trainable(adapter, cfg)
    cond, roll = sample(adapter, transformer, [prompt] * 64, list(range(64)), 10)
    ok = passes(adapter, roll.final_latents, [prompt] * 64).nonzero().flatten()
    if not len(ok):
        raise RuntimeError(f"no sample of {prompt!r} passes the verifier; pick another --memorize-prompt")
    k = int(ok[0])
    x0 = roll.final_latents[k:k + 1].expand(32, -1, -1, -1)
    tensors = {n: v[k:k + 1].expand(32, *v.shape[1:]) for n, v in cond.tensors.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    transformer.train()
    for _ in range(steps):
        loss = fm_loss(adapter, transformer, x0, tensors, gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    transformer.eval()
    _, after = sample(adapter, transformer, [prompt] * 16, list(range(500, 516)), 10)
    return {"prompt": prompt, "base_pass_rate": round(len(ok) / 64, 4), "final_loss": round(loss.item(), 4),
            "latent_mse_to_memorized": round(float((after.final_latents - x0[:1]).pow(2).mean()), 4),
            "pass_rate_after": round(float(passes(adapter, after.final_latents, [prompt] * 16).float().mean()), 4)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/toy-sd3")
    ap.add_argument("--seeds", type=int, default=4, help="seeds per held-out prompt")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--memorize-prompt", default="a photo of a circle left of a triangle")
    ap.add_argument("--memorize-steps", type=int, default=100)
    ap.add_argument("--memorize-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "toy_verifier_margin_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the LoRA's initialization (peft draws it from the global generator)
    gen = torch.Generator().manual_seed(0)
    cfg = load_config(ROOT / "examples" / "toy" / "nft_10min.yaml",
                      [f"model.model_name_or_path={args.model}"])
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    result = {"args": vars(args), "platform": platform.machine(), "torch": torch.__version__,
              "perturbation": perturbation(adapter, args.seeds, args.noise, args.repeats, gen)}
    print(json.dumps(result["perturbation"]), flush=True)
    result["memorization"] = memorization(adapter, cfg, args.memorize_prompt, args.memorize_steps,
                                          args.memorize_lr, gen)
    print(json.dumps(result["memorization"]), flush=True)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
