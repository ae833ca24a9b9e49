"""Reward scoring overlapped with sampling (``train.overlap_scoring``): one epoch's rollout +
scoring through the embedded trainer's ``sample_locally``, with the overlap off and on.

The epoch is the toy world's (``examples/toy/grpo.yaml``: the shipped toy SD3 pipeline, 4 prompts
x 8 samples at 64 px, 10 Flow-SDE steps, CFG-free here) scored by the ``toy_geneval`` verifier,
a CPU reward (connected components, shape classification) like the detectors and OCR models
GenEval-style rewards run. Micro-batches of ``--batch`` samples; off and on alternate, same
epoch plans, and the scores are checked to be identical. Also timed alone: scoring the whole
epoch (what the overlap can hide, at most all but the last micro-batch's share).

    python bench/overlap_scoring.py --repeats 6 [--threads 2]

Writes ``bench/results/overlap_scoring_cpu.json``.
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

from shared.config import load_config  # noqa: E402
from shared.models import load_adapter  # noqa: E402
from shared.rewards.multi import build_rewards, score_specs  # noqa: E402
from trainer.algorithms import ALGORITHMS  # noqa: E402
from trainer.collect import plan_epoch, sample_locally  # noqa: E402
from trainer.data import load_prompts  # noqa: E402
from trainer.policy import Policy, attach_trainable  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="samples per micro-batch (train.per_device_batch_size)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "overlap_scoring_cpu.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    cfg = load_config(ROOT / "examples" / "toy" / "grpo.yaml", [
        "train.guidance_scale=1", f"train.per_device_batch_size={args.batch}", "logging_backend=none",
        'rewards=[{"reward_model": "toy_geneval", "exact_objects": true}]'])
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    algorithm = ALGORITHMS.get(cfg.train.trainer_type)(cfg)
    rewards = build_rewards(cfg.rewards, "cpu")
    rows, _ = load_prompts(cfg.data.dataset_dir, None)
    modes = {flag: cfg.model_copy(update={"train": cfg.train.model_copy(update={"overlap_scoring": flag})})
             for flag in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    scoring: list[float] = []
    sample_locally(modes[True], adapter, policy, algorithm, rewards, plan_epoch(cfg, rows, 0, 0, 1))  # warm-up
    for r in range(args.repeats):
        plan = plan_epoch(cfg, rows, r + 1, 0, 1)
        scores = {}
        for flag in ((False, True) if r % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            _, roll, scores[flag] = sample_locally(modes[flag], adapter, policy, algorithm, rewards, plan)
            times[flag].append(time.perf_counter() - t0)
        assert all(torch.equal(scores[True][k], scores[False][k]) for k in scores[False]), "scores differ"
        t0 = time.perf_counter()
        score_specs(rewards, cfg.rewards, roll.images, plan.prompts, torch.tensor(plan.group_ids))
        scoring.append(time.perf_counter() - t0)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    result = {
        "bench": "overlap_scoring", "device": "cpu", "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(),
        "command": "python bench/overlap_scoring.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "samples_per_epoch": len(plan.prompts), "micro_batch": args.batch, "repeats": args.repeats,
        "epoch_rollout_and_score_s": {"overlap_off": round(off, 4), "overlap_on": round(on, 4)},
        "scoring_alone_s": round(statistics.median(scoring), 4),
        "saved_s": round(off - on, 4), "saved_fraction_of_scoring": round((off - on) / statistics.median(scoring), 3),
        "all_s": {"overlap_off": [round(t, 4) for t in times[False]], "overlap_on": [round(t, 4) for t in times[True]]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("epoch_rollout_and_score_s", "scoring_alone_s", "saved_s",
                                             "saved_fraction_of_scoring")}))
    return result


if __name__ == "__main__":
    main()
