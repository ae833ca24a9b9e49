"""Run under ``torch.distributed.run --nproc_per_node 2``: a context-parallel group of 2 with the queue
transport, where the leader's collect fails. Rank 0 is the leader (:class:`ShareSamples` over a
transport whose collect raises), rank 1 a :class:`GroupMember`; each writes what it raised to
``argv[1]/probe-rank{r}.json``: neither may wait forever."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.context_parallel import GroupMember, Groups, ShareSamples
from trainer.transport import CollectError


class Failing:
    duplicates = 0

    def collect(self, pending):
        raise CollectError("epoch 0: 3 of 4 samples not scored after queue.collect_timeout_s=1 s")


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    groups = Groups(cp=dist.group.WORLD, data=dist.new_group([0]), src=0, leader=rank == 0)
    device = torch.device("cpu")
    if groups.leader:
        transport = ShareSamples(Failing(), groups, device)
    else:
        transport = GroupMember(None, None, None, groups, device, barrier=lambda: None)
    try:
        transport.collect(None)
        raised = None
    except CollectError as e:
        raised = str(e)
    (out / f"probe-rank{rank}.json").write_text(json.dumps({"raised": raised,
                                                            "duplicates": transport.duplicates}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
