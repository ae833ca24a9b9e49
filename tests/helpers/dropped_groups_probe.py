"""Run under ``accelerate launch`` with 2 processes: ``trainer.cli train CONFIG`` where, in epoch 0,
each process loses one of its prompt groups after sampling (as when a queue drops groups after
dead-lettered tasks: every process keeps the same number of rows, rank 0 its second group, rank 1
its first), so the epoch has fewer micro-batches than one optimizer step plans for. After each
epoch's optimization every process writes the sum and a digest of its trainable parameters to
``OUT/params{rank}.json`` (tests/trainer/test_multiprocess.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import torch

from trainer import loop
from trainer.collect import Samples
from trainer.transport import LocalTransport

OUT = Path(sys.argv[1])
seen: list[dict] = []


def drop_one_group(samples: Samples, group_size: int, rank: int) -> Samples:
    n = samples.rollout.final_latents.shape[0]
    groups = list(range(n // group_size))
    lost = groups[-1] if rank == 0 else groups[0]
    rows = [i for i in range(n) if i // group_size != lost]
    index = torch.tensor(rows)

    def take(value):
        return value[index.to(value.device)] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n \
            else value

    roll = dataclasses.replace(samples.rollout, **{f.name: take(getattr(samples.rollout, f.name))
                                                   for f in dataclasses.fields(samples.rollout) if f.name != "sigmas"})
    return Samples(samples.cond.select(index), roll, {k: v[index] for k, v in samples.rewards.items()},
                   [samples.policy_versions[i] for i in rows], dict(samples.metrics), rows=rows)


def main() -> None:
    collect, optimize = LocalTransport.collect, loop.optimize
    calls = {"collect": 0}

    def lossy_collect(self, handle):
        samples = collect(self, handle)
        calls["collect"] += 1
        if calls["collect"] == 1:
            import torch.distributed as dist

            samples = drop_one_group(samples, self.cfg.train.group_size, dist.get_rank())
        return samples

    def recording_optimize(cfg, accelerator, policy, *args, **kwargs):
        out = optimize(cfg, accelerator, policy, *args, **kwargs)
        params = [p.detach().double().cpu() for p in policy.model.parameters() if p.requires_grad]
        flat = torch.cat([p.reshape(-1) for p in params])
        seen.append({"sum": float(flat.sum()), "digest": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
                     "step": out[0]})
        (OUT / f"params{accelerator.process_index}.json").write_text(json.dumps(seen))
        return out

    LocalTransport.collect, loop.optimize = lossy_collect, recording_optimize
    from trainer.cli import main as cli

    cli(["train", sys.argv[2], "--set", "run_name=dropped"])


if __name__ == "__main__":
    main()
