"""TempFlow-GRPO's branching with a shared ODE prefix (``train.shared_initial_noise``): rollout time of
one group of K members that branch at SDE step k, against the same rollout where every member has its
own initial noise (no prefix to share), on the shipped toy SD3 pipeline.

Each setting rolls out ``--groups`` prompts x ``--k`` members at 64 px, 10 Flow-SDE steps, one SDE step
(the branch) at each of ``--branch-steps``; with shared noise the steps before the branch run once per
group (``shared.sampling.shared_prefix_rows``). Off and on alternate, ``--repeats`` times; medians.

    python bench/prefix_sharing.py --repeats 3 [--threads 2]

Writes ``bench/results/prefix_sharing_cpu.json``. The expected ratio is the transformer rows' ratio,
``(k + (T - k) K) / (T K)`` with T = 10 steps; the measured one includes the VAE decode and the
per-step overhead, which sharing does not remove.
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
from shared.models import load_adapter  # noqa: E402
from shared.sampling import rollout_batches  # noqa: E402

STEPS = 10


def one(adapter, prompts, seeds, init_seeds, branch: int, batch: int) -> float:
    t0 = time.perf_counter()
    rollout_batches(adapter, prompts, [None] * len(prompts), seeds, batch_size=batch, resolution=(64, 64),
                    num_steps=STEPS, guidance_scale=1.0, dynamics="Flow-SDE", noise_level=0.7,
                    sde_steps=[branch], keep_means=False, log_prob_reduction="mean",
                    transformer=adapter.transformer, init_seeds=init_seeds)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--branch-steps", type=int, nargs="+", default=[0, 3, 6, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default=str(ROOT / "assets" / "toy-sd3"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefix_sharing_cpu.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = load_adapter(ModelConfig(model_type="sd3-5", model_name_or_path=args.model),
                           device=torch.device("cpu"), seed=0)
    prompts = [f"a photo of a {c} circle" for c in ("red", "blue", "green", "yellow")][: args.groups]
    prompts = [q for q in prompts for _ in range(args.k)]
    seeds = list(range(100, 100 + len(prompts)))
    shared = [seeds[(i // args.k) * args.k] for i in range(len(prompts))]  # each group: its first member's
    batch = args.k  # one group per micro-batch, as the trainer's rollout batches hold whole groups
    with torch.no_grad():
        one(adapter, prompts[:1], seeds[:1], None, 0, 1)  # warm-up
        rows = []
        for branch in args.branch_steps:
            own, sharing = [], []
            for _ in range(args.repeats):
                own.append(one(adapter, prompts, seeds, None, branch, batch))
                sharing.append(one(adapter, prompts, seeds, shared, branch, batch))
            o, s = statistics.median(own), statistics.median(sharing)
            rows.append({"branch_step": branch, "own_noise_s": round(o, 3), "shared_prefix_s": round(s, 3),
                         "ratio": round(s / o, 3),
                         "rows_ratio": round((branch + (STEPS - branch) * args.k) / (STEPS * args.k), 3)})
            print(f"branch at step {branch}: own noise {o:.2f} s, shared prefix {s:.2f} s "
                  f"(x{s / o:.2f}; transformer rows x{rows[-1]['rows_ratio']:.2f})")
    result = {"bench": "prefix_sharing", "device": "cpu", "threads": torch.get_num_threads(),
              "machine": platform.machine(), "groups": args.groups, "k": args.k, "steps": STEPS,
              "resolution": 64, "repeats": args.repeats, "rows": rows,
              "command": "python bench/prefix_sharing.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"bench": "prefix_sharing", "rows": rows}))
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
