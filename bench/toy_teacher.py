"""How good a teacher is the toy base under classifier-free guidance, and can a variant of CFG
make a better one?

``train.ref_guidance_scale`` anchors a CFG-free policy to the frozen base's guided velocity, so
the policy can at best distil what that guided base does (docs/results.md, e54-e58). This probe
evaluates the shipped base on the held-out prompts (ODE, 10 steps, the evaluation's seeds) as a
teacher would act, under:

* ``cfg W``: plain CFG ``v_u + W (v_c - v_u)``;
* ``interval W >s``: CFG at ``W`` only where ``sigma > s`` and none below (guidance applied in a
  limited interval of noise levels, Kynkaanniemi et al. 2024), where the layout is decided;
* ``contrastive W``: CFG at ``W`` whose negative prompt for a position prompt is the reversed
  relation ("a circle right of a square" for "a circle left of a square") and for a colour
  attribution prompt the swapped colours, so guidance pushes away from the wrong binding
  (every other prompt keeps the empty negative).

    python bench/toy_teacher.py            # ~4 min on 2 CPU cores

Writes ``bench/results/toy_teacher_cpu.json`` (overall and per-category accuracy per variant).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shared.models.base as model_base  # noqa: E402
from shared.config import load_config  # noqa: E402
from trainer.eval_cli import eval_checkpoint  # noqa: E402

COLORS = "red|green|blue|yellow|purple|cyan"
SWAPS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
VARIANTS = ["cfg 1", "cfg 4.5", "interval 4.5 >0.5", "interval 4.5 >0.75", "contrastive 4.5"]


def contrastive_negative(prompt: str, category: str) -> str | None:
    """The prompt with its binding reversed (position: the relation; color_attr: the two colours),
    or None for the other categories."""
    if category == "position":
        for word, other in SWAPS.items():
            if f" {word} " in prompt:
                return prompt.replace(f" {word} ", f" {other} ")
    if category == "color_attr":
        m = re.fullmatch(rf"(.*)\b({COLORS}) (\w+) and a ({COLORS}) (\w+)", prompt)
        if m:
            return f"{m[1]}{m[4]} {m[3]} and a {m[2]} {m[5]}"
    return None


def write_contrastive(dataset_dir: Path, out: Path) -> Path:
    """Copy the dataset to ``out`` with contrastive ``negative_prompt``s on its rows."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (dataset_dir / f"{split}.jsonl").read_text().splitlines() if line]
        for row in rows:
            negative = contrastive_negative(row["prompt"], row.get("metadata", {}).get("category", ""))
            if negative is not None:
                row["negative_prompt"] = negative
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@contextlib.contextmanager
def guidance_interval(threshold: float):
    """Every adapter's CFG velocity uses its scale only where ``sigma > threshold`` (1 below)."""
    original = model_base.FlowModelAdapter.velocity

    def velocity(self, latents, sigma, cond, guidance_scale, transformer=None):
        if guidance_scale <= 1.0 or cond.negative is None:
            return original(self, latents, sigma, cond, guidance_scale, transformer)
        module = transformer if transformer is not None else self.transformer
        v_cond, v_uncond = self.cfg_velocities(module, latents, sigma, cond)
        w = torch.where(sigma > threshold, guidance_scale, 1.0).float()
        return v_uncond + w.view(-1, *[1] * (latents.dim() - 1)) * (v_cond - v_uncond)

    model_base.FlowModelAdapter.velocity = velocity
    try:
        yield
    finally:
        model_base.FlowModelAdapter.velocity = original


def run_variant(config: Path, variant: str, index: int, work: Path, extra: list[str]) -> dict:
    kind, scale, *rest = variant.split()
    overrides = [f"eval.guidance_scale={scale}", f"output_dir={work}", "logging_backend=none",
                 f"run_name=teacher_{index}"] + extra
    cfg = load_config(config, overrides)
    ctx = contextlib.nullcontext()
    if kind == "interval":
        ctx = guidance_interval(float(rest[0].lstrip(">")))
    elif kind == "contrastive":
        data = write_contrastive(Path(cfg.data.dataset_dir), work / "contrastive_data")
        cfg = load_config(config, overrides + [f"data.dataset_dir={data}"])
    elif kind != "cfg":
        raise ValueError(f"unknown variant {variant!r}: use 'cfg W', 'interval W >s' or 'contrastive W'")
    with ctx:
        result = eval_checkpoint(cfg, None)
    acc = {k.removeprefix("eval/toy_geneval/"): round(v, 4) for k, v in result.items()
           if k.startswith("eval/toy_geneval/accuracy")}
    print(f"{variant:22s} accuracy {acc['accuracy']:.4f}", flush=True)
    return {"variant": variant, **acc}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "examples" / "toy" / "nft_10min.yaml")
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "toy_teacher_cpu.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_variant(args.config, v, i, Path(tmp), args.set) for i, v in enumerate(args.variants)]
    result = {"config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
              "machine": platform.machine(), "threads": torch.get_num_threads(), "overrides": args.set,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"bench": "toy_teacher", "rows": rows}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
