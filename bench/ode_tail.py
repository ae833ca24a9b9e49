"""MixGRPO-Flash's short deterministic tail (``train.ode_tail``): rollout time and what the reward
sees, against the plain rollout, on the shipped toy SD3 pipeline.

Each setting rolls out the toy world's held-out prompts (``examples/data/toy/test.jsonl``) x ``--seeds``
seeds at 64 px, 10 Flow-SDE steps (noise 0.7), CFG 4.5 as ``examples/toy/grpo.yaml``, with the SDE
window at ``--window`` (the trained steps); the steps after the window run as given (plain: Euler on
the whole grid) or cut by ``ratio`` as MixGRPO-Flash cuts them (``shared.flow.solvers.tail_grid``) with
Euler or DPM-Solver++ (order 2). The SDE steps
are the same in every setting (same seeds), so the rollouts differ only in the tail. Reported per
setting: median seconds over ``--repeats`` (settings interleaved), transformer forwards, the mean
``toy_geneval`` reward of the final images, and their mean absolute pixel difference to the plain
rollout's (0-1 scale).

    python bench/ode_tail.py --repeats 3 [--threads 2]

Writes ``bench/results/ode_tail_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import ModelConfig  # noqa: E402
from shared.flow.solvers import tail_grid  # noqa: E402
from shared.models import load_adapter  # noqa: E402
from shared.rewards import build_reward  # noqa: E402
from shared.sampling import rollout_batches  # noqa: E402

STEPS = 10
SETTINGS = [("plain", None, 1.0), ("euler 0.4", "euler", 0.4), ("dpm_solver++ 0.4", "dpm_solver++", 0.4),
            ("dpm_solver++ 0.2", "dpm_solver++", 0.2)]


def run(adapter, prompts, seeds, window, solver, ratio) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    _, roll = rollout_batches(adapter, prompts, [None] * len(prompts), seeds, batch_size=16, resolution=(64, 64),
                              num_steps=STEPS, guidance_scale=4.5, dynamics="Flow-SDE", noise_level=0.7,
                              sde_steps=window, keep_means=False, log_prob_reduction="mean",
                              transformer=adapter.transformer, tail_solver=solver, tail_ratio=ratio)
    return time.perf_counter() - t0, roll.images


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--prompts", type=int, default=None, help="the first N held-out prompts (default: all 47)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default=str(ROOT / "assets" / "toy-sd3"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ode_tail_cpu.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = load_adapter(ModelConfig(model_type="sd3-5", model_name_or_path=args.model),
                           device=torch.device("cpu"), seed=0)
    reward = build_reward("toy_geneval")
    rows_in = [json.loads(line) for line in (ROOT / "examples/data/toy/test.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows_in[: args.prompts] for _ in range(args.seeds)]
    seeds = [1000 + i for i in range(len(prompts))]
    tail = STEPS - max(args.window) - 1
    times: dict[str, list[float]] = {name: [] for name, _, _ in SETTINGS}
    images: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        run(adapter, prompts[:2], seeds[:2], args.window, None, 1.0)  # warm-up
        for _ in range(args.repeats):
            for name, solver, ratio in SETTINGS:
                seconds, imgs = run(adapter, prompts, seeds, args.window, solver, ratio)
                times[name].append(seconds)
                images[name] = imgs
    rows = []
    for name, solver, ratio in SETTINGS:
        kept = tail if solver is None else tail_grid(torch.linspace(1, 0, STEPS + 1), max(args.window), ratio).shape[0] - 1 - (max(args.window) + 1)
        score = reward.score(images[name], prompts).float().mean().item()
        diff = (images[name] - images["plain"]).abs().mean().item()
        rows.append({"setting": name, "seconds": round(statistics.median(times[name]), 3),
                     "forwards_per_rollout": max(args.window) + 1 + kept, "toy_geneval": round(score, 4),
                     "mean_abs_diff_to_plain": round(diff, 4)})
        print(f"{name:18s} {rows[-1]['seconds']:6.2f} s  {rows[-1]['forwards_per_rollout']:2d} forwards  "
              f"toy_geneval {score:.4f}  |diff| {diff:.4f}")
    plain = rows[0]["seconds"]
    for row in rows:
        row["time_ratio"] = round(row["seconds"] / plain, 3)
    result = {"bench": "ode_tail", "device": "cpu", "threads": torch.get_num_threads(), "machine": platform.machine(),
              "images": len(prompts), "steps": STEPS, "window": args.window, "resolution": 64, "cfg": 4.5,
              "repeats": args.repeats, "rows": rows,
              "command": "python bench/ode_tail.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
