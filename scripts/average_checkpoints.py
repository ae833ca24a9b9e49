"""Average the weights of several checkpoints of one LoRA run into a new checkpoint folder
(tail averaging, as a "model soup" of one run's last checkpoints).

The LoRA file (``lora*/pytorch_lora_weights.safetensors``) and the EMA shadow
(``ema.safetensors``) are averaged tensor by tensor, in float32; everything else (the LoRA
metadata, ``trainer_state.json``) is copied from the last checkpoint given. The result loads
like any checkpoint: ``flowrl eval <config> --checkpoint <out>``, or a pipeline's
``load_lora_weights(<out>/lora)``. Example (the last three checkpoints of a run saved every 25
epochs, ``train.save_freq=25``)::

    python scripts/average_checkpoints.py runs/avg runs/r/checkpoints/checkpoint-200 \
        runs/r/checkpoints/checkpoint-225 runs/r/checkpoints/final

``--scale S`` then multiplies every LoRA update ``B A`` by ``S`` (its ``lora_B`` tensors; one
checkpoint is enough): ``S > 1`` extrapolates away from the base model along what training
changed (ExPO, Zheng et al. 2024, "Model Extrapolation Expedites Alignment"), ``S < 1``
interpolates back towards the base, ``S = 0`` is the base::

    python scripts/average_checkpoints.py runs/x1.25 runs/r/checkpoints/final --scale 1.25
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file


def average_files(files: list[Path], out: Path, scale: float = 1.0) -> None:
    """Write the tensor-wise float32 mean of ``files`` (safetensors with the same keys and shapes)
    to ``out``, keeping the last file's metadata; the ``lora_B`` tensors are multiplied by ``scale``
    (so each LoRA update ``B A`` is)."""
    states = [load_file(str(f)) for f in files]
    keys = set(states[0])
    for f, state in zip(files, states):
        if set(state) != keys:
            raise ValueError(f"{f} holds other tensors than {files[0]} ({len(set(state) ^ keys)} keys differ): "
                             f"average checkpoints of one run only.")
    with safe_open(str(files[-1]), "pt") as handle:
        metadata = handle.metadata()
    mean = {k: (sum(s[k].float() for s in states) / len(states)).contiguous() for k in sorted(keys)}
    if scale != 1.0:
        mean = {k: v * scale if ".lora_B." in k else v for k, v in mean.items()}
    save_file(mean, str(out), metadata=metadata)


def average_checkpoints(checkpoints: list[Path], out: Path, scale: float = 1.0) -> Path:
    """Average ``checkpoints`` (LoRA runs) into ``out`` (replaced if present) and multiply the
    LoRA updates by ``scale``; returns ``out``."""
    if len(checkpoints) < 2 and scale == 1.0:
        raise ValueError("give at least two checkpoints to average (or one with --scale)")
    for c in checkpoints:
        if not (c / "trainer_state.json").is_file():
            raise FileNotFoundError(f"{c} is not a flowrl checkpoint (no trainer_state.json). Fix: pass "
                                    f"runs/<run>/checkpoints/<name> folders.")
    last = checkpoints[-1]
    weights = sorted(p.relative_to(last) for p in last.glob("lora*/pytorch_lora_weights.safetensors"))
    if not weights:
        raise ValueError(f"{last} has no lora*/pytorch_lora_weights.safetensors: only LoRA checkpoints are averaged.")
    if (last / "ema.safetensors").is_file():
        weights.append(Path("ema.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(last, out, ignore=shutil.ignore_patterns("resume"))
    for rel in weights:
        missing = [c for c in checkpoints if not (c / rel).is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0] / rel} is missing: the checkpoints must hold the same files.")
        average_files([c / rel for c in checkpoints], out / rel, scale)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="the averaged checkpoint folder to write")
    p.add_argument("checkpoints", type=Path, nargs="+", help="checkpoint folders of one run, last one last")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply each LoRA update by this (>1 extrapolates from the base, 0 is the base)")
    args = p.parse_args(argv)
    out = average_checkpoints(args.checkpoints, args.out, args.scale)
    print(f"averaged {len(args.checkpoints)} checkpoint(s), LoRA x {args.scale} -> {out}")


if __name__ == "__main__":
    main()
