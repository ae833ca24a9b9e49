"""Per-GPU persistent memory of every example recipe on 8 GPUs, by arithmetic (``trainer/memory.py``,
what ``flowrl check CONFIG --world-size 8 --memory`` prints), on the real-size transformer
architectures: each family's ``transformer/config.json`` as ``bench/gpu/models.py`` builds it (no
hub access: the configs are written to a temporary folder), and for Wan2.2-A14B two Wan 14B experts
(diffusers ``scripts/convert_wan_to_diffusers.py``: 40 layers, 40 x 128 heads, ffn 13824; in_channels
16 for T2V, 36 for I2V).

    python bench/memory_plan.py            # writes bench/results/memory_plan.json and docs/models.md's table
    python bench/memory_plan.py --out /tmp/plan.json --no-doc

Arithmetic, not a measurement: activations, text encoders, the VAE, reward models and the CUDA
context are not counted (docs/models.md's device rows measure whole peaks).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "gpu"))  # bench/gpu/models.py imports its neighbours by name

from models import transformer_config  # noqa: E402  (bench/gpu/models.py)
from shared.config import TRAINER_TYPES, load_config  # noqa: E402
from trainer.memory import memory_report  # noqa: E402

OUT = ROOT / "bench" / "results" / "memory_plan.json"
DOC = ROOT / "docs" / "models.md"
START, END = "<!-- memory_plan:start -->", "<!-- memory_plan:end -->"
WORLD = 8

WAN_A14B = dict(added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-6, ffn_dim=13824,
                freq_dim=256, num_attention_heads=40, num_layers=40, out_channels=16, patch_size=[1, 2, 2],
                qk_norm="rms_norm_across_heads", text_dim=4096)


def configs_for(recipe: Path) -> list[tuple[str, dict]]:
    """``[(subfolder, config.json values)]`` of the recipe's denoiser(s)."""
    family = recipe.stem
    if family.endswith("-a14b"):
        experts = {**WAN_A14B, "in_channels": 36 if family.startswith("wan2_i2v") else 16,
                   "_class_name": "WanTransformer3DModel"}
        return [("transformer", experts), ("transformer_2", experts)]
    cls, values = transformer_config(family)
    return [("transformer", {**values, "_class_name": cls})]


def recipes() -> list[Path]:
    return sorted(p for p in (ROOT / "examples").glob("*/*/*.yaml")
                  if p.parts[-3] in TRAINER_TYPES and p.parts[-2] in ("lora", "full"))


def plan(recipe: Path, folder: Path) -> dict:
    for sub, values in configs_for(recipe):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(values, default=list))
    (folder / "model_index.json").write_text("{}")  # a pipeline folder of configs only: the loader's checks pass
    cfg = load_config(recipe, [f"model.model_name_or_path={folder}"])
    report = memory_report(cfg, WORLD)
    return {"recipe": str(recipe.relative_to(ROOT / "examples")), "model_type": cfg.model.model_type,
            "finetune_type": cfg.model.finetune_type, **report}


def table(rows: list[dict]) -> str:
    head = ("| recipe | transformer params | trained | FSDP | frozen | trained + grads + AdamW | EMA | KL ref "
            "| gathered block | total GiB / GPU |\n|---|---|---|---|---|---|---|---|---|---|\n")
    out = []
    for r in rows:
        p, g = r["params"], r["gib_per_process"]
        optim = g["trained_weights"] + g["gradients"] + g["adam_moments"]
        out.append(f"| `{r['recipe']}` | {(p['frozen'] + p['trained']) / 1e9:.2f} B | {p['trained'] / 1e6:,.0f} M "
                   f"| {'yes' if r['fsdp'] else 'no'} | {g['frozen_weights']:.1f} | {optim:.1f} | {g['ema']:.1f} "
                   f"| {g['kl_reference']:.1f} | {g['gathered_block']:.1f} | **{g['total']:.1f}** |")
    return head + "\n".join(out) + "\n"


def write_doc(rows: list[dict]) -> None:
    text = DOC.read_text()
    body = (f"{START}\n`python bench/memory_plan.py` ({WORLD} GPUs; GiB per GPU of persistent state, arithmetic "
            f"from the real-size parameter counts: frozen weights in `model.options.transformer_dtype`, trained "
            f"weights and gradients in `model.master_weight_dtype`, AdamW's two float32 moments, the float32 EMA and "
            f"a full fine-tune's KL reference when they are on the GPU, all split over the GPUs under "
            f"`train.fsdp`, which also gathers one block at a time. Not counted: activations, text encoders, "
            f"VAE, reward models, CUDA context.)\n\n{table(rows)}{END}")
    if START in text:
        text = text[:text.index(START)] + body + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n### Persistent memory per GPU of the example recipes\n\n" + body + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> list[dict]:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/models.md's table")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, recipe in enumerate(recipes()):
            rows.append(plan(recipe, Path(tmp) / str(i)))
            print(json.dumps({"recipe": rows[-1]["recipe"],
                              "gib_per_process": rows[-1]["gib_per_process"]["total"]}), flush=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if not args.no_doc:
        write_doc(rows)
    return rows


if __name__ == "__main__":
    main()
