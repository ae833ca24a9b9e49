"""Run under ``torch.distributed.run --nproc_per_node 2``: a context-parallel group of 2 with the queue
transport, whose process groups time out after 2 s, where the leader's collect takes 4 s and then
fails. Rank 0 is the leader (:class:`ShareSamples` over a transport whose collect raises), rank 1 a
:class:`GroupMember` waiting in the group :func:`share_groups` makes (its timeout: the collect's,
``queue.collect_timeout_s`` = 1 s, plus 10 minutes); each writes what it raised to
``argv[1]/probe-rank{r}.json``: neither may wait forever, nor give up while the leader collects."""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from types import SimpleNamespace
from pathlib import Path

import torch.distributed as dist

from trainer.context_parallel import Groups
from trainer.cp_queue import GroupMember, ShareSamples, share_groups
from trainer.transport import CollectError


class Failing:
    duplicates = 0

    def collect(self, pending):
        time.sleep(4)  # longer than the default groups' timeout
        raise CollectError("epoch 0: 3 of 4 samples not scored after queue.collect_timeout_s=1 s")


def main(out: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=2))
    rank = dist.get_rank()
    cfg = SimpleNamespace(train=SimpleNamespace(context_parallel=2), queue=SimpleNamespace(collect_timeout_s=1))
    share, leaders = share_groups(cfg)
    groups = Groups(cp=dist.group.WORLD, data=dist.new_group([0]), src=0, leader=rank == 0, share=share,
                    leaders=leaders)
    if groups.leader:
        transport = ShareSamples(Failing(), groups)
    else:
        transport = GroupMember(None, None, None, groups, barrier=lambda: None)
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
