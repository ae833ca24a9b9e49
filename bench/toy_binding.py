"""Where does a toy pipeline fail: the autoencoder, drawing the named objects, or binding?

A diagnostic for the toy world (issue 3), to run on a base model before any RL: RL raises how
often the named shapes are drawn, but it has not taught a model to bind colours to shapes or
relations to positions it binds at chance (docs/results.md). Three measurements on ``--model``:

* **autoencoder**: ground-truth renders of the held-out prompts (``--seeds`` scenes each) go
  through the pipeline's VAE (posterior mean, decode) and the verifier: the pass rate of the
  renders and of their round trips (below 1.0, the VAE itself loses what the verifier checks);
* **binding**: ODE samples (10 steps, guidance ``--guidance``, ``--seeds`` seeds) of up to
  ``--prompts`` prompts per category, from the train split and from the held-out split: per
  category accuracy (GenEval's checks), presence (every named shape detected) and accuracy
  given presence, and how cleanly the samples draw their shapes (``shape_quality``: the mean
  best-template IoU of the detections, clean renders >= 0.96; over all samples, the correct ones
  and the wrong ones). Train-split binding at chance means the model never learned it (not a
  failure to generalize to held-out combinations);
* **text**: how far apart the text encoders put prompts that differ only in binding (colours
  swapped between the shapes, left/right flipped) compared with prompts that differ in what is
  drawn (other colours, another relation): ``|a - b| / mean(|a|, |b|)`` of the token features
  (``prompt_embeds``, what the MMDiT attends to) and of the pooled vectors.

    python bench/toy_binding.py                                   # ~3 min on 2 CPU cores
    python bench/toy_binding.py --model runs/pt128/final --out /tmp/pt128.json

Writes ``bench/results/toy_binding_cpu.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from shared.config import load_config  # noqa: E402
from shared.models import load_adapter  # noqa: E402
from shared.toy.scenes import prompt_text, sample_pair, split  # noqa: E402
from shared.toy.verify import shape_quality, verify  # noqa: E402
from shared.rewards.builtin import to_uint8_hwc  # noqa: E402
from toy_self_sft import sample, write_json  # noqa: E402

BINDING_CATEGORIES = ("two_object", "counting", "colors", "position", "color_attr")
# (name, a, b): prompts differing in binding only, then in content, for the text measurement
TEXT_PAIRS = (
    ("colours swapped", "a photo of a red square and a blue circle", "a photo of a blue square and a red circle"),
    ("shapes swapped", "a photo of a red square and a blue circle", "a photo of a red circle and a blue square"),
    ("left / right", "a photo of a circle left of a triangle", "a photo of a circle right of a triangle"),
    ("objects swapped", "a photo of a circle left of a triangle", "a photo of a triangle left of a circle"),
    ("left / above", "a photo of a circle left of a triangle", "a photo of a circle above a triangle"),
    ("other colours", "a photo of a red square and a blue circle", "a photo of a green square and a yellow circle"),
)


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / ((|a| + |b|) / 2)`` (Frobenius norms): 0 identical, ~1.4 for unrelated vectors
    of equal norm."""
    return float((a - b).norm() / (0.5 * (a.norm() + b.norm())))


def mean_or_none(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def autoencoder(adapter, seeds: int) -> dict:
    prompts, renders = [], []
    for spec in split()[1]:
        for s in range(seeds):
            prompt, image = sample_pair(spec, 1000 + s)
            prompts.append(prompt)
            renders.append(image)
    x = torch.from_numpy(np.stack(renders)).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, 64, 64]
    with torch.no_grad():
        decoded = adapter.decode(adapter.encode_latents(x.to(adapter.device)))
    rt = to_uint8_hwc(decoded)
    return {"scenes": len(prompts),
            "render_pass": float(np.mean([verify(i, p).correct for i, p in zip(renders, prompts)])),
            "round_trip_pass": float(np.mean([verify(i, p).correct for i, p in zip(rt, prompts)]))}


def binding(adapter, which: str, per_category: int, seeds: int, guidance: float) -> dict:
    specs = split()[0 if which == "train" else 1]
    out = {}
    rng = random.Random(0)
    for category in BINDING_CATEGORIES:
        mine = [s for s in specs if s.category == category]
        rng.shuffle(mine)
        prompts = [prompt_text(s) for s in mine[:per_category] for _ in range(seeds)]
        _, roll = sample(adapter, adapter.transformer, prompts, list(range(len(prompts))), 10, guidance)
        images = to_uint8_hwc(roll.images)
        verdicts = [verify(i, p) for i, p in zip(images, prompts)]
        quality = [shape_quality(i) for i in images]
        correct = sum(v.correct for v in verdicts)
        present = sum(v.present for v in verdicts)
        out[category] = {"images": len(verdicts), "accuracy": correct / len(verdicts),
                         "present": present / len(verdicts),
                         "accuracy_given_present": correct / present if present else None,
                         "shape_quality": mean_or_none(quality),
                         "shape_quality_correct": mean_or_none([q for q, v in zip(quality, verdicts) if v.correct]),
                         "shape_quality_wrong": mean_or_none([q for q, v in zip(quality, verdicts) if not v.correct])}
    return out


def text(adapter) -> dict:
    out = {}
    with torch.no_grad():
        for name, a, b in TEXT_PAIRS:
            t = adapter.encode_prompts([a, b], cfg=False).tensors
            out[name] = {"a": a, "b": b,
                         "tokens": round(relative_distance(t["prompt_embeds"][0], t["prompt_embeds"][1]), 4),
                         "pooled": round(relative_distance(t["pooled"][0], t["pooled"][1]), 4)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/toy-sd3")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per prompt (and renders per held-out prompt)")
    ap.add_argument("--prompts", type=int, default=12, help="prompts per category and split")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (the verifier runs on the CPU)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "toy_binding_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "examples" / "toy" / "nft_10min.yaml", [f"model.model_name_or_path={args.model}"])
    adapter = load_adapter(cfg.model, device=torch.device(args.device), seed=0)
    result = {"args": vars(args), "platform": platform.machine(), "torch": torch.__version__,
              "autoencoder": autoencoder(adapter, args.seeds), "text": text(adapter),
              "binding": {w: binding(adapter, w, args.prompts, args.seeds, args.guidance)
                          for w in ("train", "held_out")}}
    ae = result["autoencoder"]
    print(f"autoencoder: renders pass {ae['render_pass']:.3f}, VAE round trips pass {ae['round_trip_pass']:.3f} "
          f"({ae['scenes']} held-out scenes)")
    print("text distance (tokens / pooled):")
    for name, d in result["text"].items():
        print(f"  {name:16s} {d['tokens']:.2f} / {d['pooled']:.2f}")
    print(f"{'split':9s} {'category':11s} accuracy present acc|present shape_quality (correct / wrong)")
    show = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for which, cats in result["binding"].items():
        for c, r in cats.items():
            print(f"{which:9s} {c:11s} {r['accuracy']:.3f}    {r['present']:.3f}   {show(r['accuracy_given_present'])}"
                  f"      {show(r['shape_quality'])} ({show(r['shape_quality_correct'])} / "
                  f"{show(r['shape_quality_wrong'])})")
    print(json.dumps({"bench": "toy_binding", "binding": result["binding"]}))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
