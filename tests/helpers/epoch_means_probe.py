"""Run under ``accelerate launch`` with 2 processes: each writes ``trainer.loop.epoch_means`` of
its own metric sums to ``OUT/means{rank}.json`` and ``trainer.collect.across_processes`` of its own
queue metrics to ``OUT/queue{rank}.json``, and whether ``_check_finite`` let it step with a NaN
loss on rank 1 to ``OUT/finite{rank}.json`` (tests/trainer/test_multiprocess.py)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
from accelerate import Accelerator

from trainer.collect import across_processes
from trainer.loop import _check_finite, epoch_means

if __name__ == "__main__":
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    sums = {"loss": torch.tensor(4.0), "only0": 2.0} if rank == 0 else {"loss": torch.tensor(8.0)}
    means = epoch_means(accelerator, sums, 4)
    (Path(sys.argv[1]) / f"means{rank}.json").write_text(json.dumps(means))
    queue = {"queue/policy_lag": 0.5 + rank, "queue/policy_lag_max": 1.0 + rank, "queue/dropped_samples": 2.0,
             "queue/duplicates_total": float(rank), "queue/samplers": 3.0 - rank, "queue/collect_seconds": 4.0 * rank}
    (Path(sys.argv[1]) / f"queue{rank}.json").write_text(json.dumps(across_processes(accelerator, queue)))
    try:  # rank 1's loss is NaN: both processes must stop before the optimizer step
        _check_finite(types.SimpleNamespace(trainer_type="grpo"), 3, [(0, torch.tensor(1.0 if rank == 0 else float("nan")))],
                      accelerator)
        outcome = "stepped"
    except FloatingPointError as e:
        outcome = str(e)
    (Path(sys.argv[1]) / f"finite{rank}.json").write_text(json.dumps(outcome))
    accelerator.wait_for_everyone()
