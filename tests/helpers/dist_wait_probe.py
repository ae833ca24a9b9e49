"""Run under ``torch.distributed.run --nproc_per_node 2`` (CPU, gloo, the run's Accelerator with
``train.dist_timeout_s`` = 2 s): what the trainer processes wait on. Writes ``argv[1]/probe-rank{r}.json``:

* ``name``: the run name each process takes without ``run_name``, rank 1 asking 1.5 s later (the
  default name holds the time; every process must write into one folder and one set of queue keys);
* ``agreed``: the smallest count over the processes (:func:`trainer.transport.fewest_over`, over a
  :func:`~trainer.transport.patient_group`; ``queue.collect_timeout_s`` = 1 s) where rank 1 collects
  4 s longer than rank 0: rank 0 must wait for it;
* ``default_group``: what the same wait does in the default group: it gives up after
  ``train.dist_timeout_s``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from trainer.loop import make_accelerator, run_name
from trainer.transport import fewest_over, patient_group


def main(out: Path) -> None:
    cfg = SimpleNamespace(run_name=None, model=SimpleNamespace(model_type="sd3-5"),
                          train=SimpleNamespace(trainer_type="grpo", mixed_precision="no", dist_timeout_s=2),
                          queue=SimpleNamespace(collect_timeout_s=1))
    accelerator = make_accelerator(cfg)
    rank = accelerator.process_index
    if rank == 1:
        time.sleep(1.5)
    name = run_name(cfg, accelerator)
    patient = patient_group(cfg, [0, 1])
    if rank == 1:
        time.sleep(4)  # still collecting, longer than the default groups' timeout
    agreed = fewest_over(patient, 7 - rank)
    if rank == 1:
        time.sleep(4)
    try:
        dist.all_reduce(torch.tensor([1]))
        default_group = "waited"
    except RuntimeError as e:
        default_group = f"{type(e).__name__}: {str(e)[:200]}"
    (out / f"probe-rank{rank}.json").write_text(json.dumps({"name": name, "agreed": agreed,
                                                            "default_group": default_group}))
    # the default group is broken now (it timed out on purpose): tearing it down at exit can abort the
    # process (SIGABRT, "terminate called without an active exception"), so leave without teardown
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
