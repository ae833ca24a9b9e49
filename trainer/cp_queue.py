"""``train.context_parallel`` with ``transport: celery``: each context-parallel group's first process
(its leader) runs the queue transport as its data rank, ``rank // C`` of ``world / C``, and sends
each epoch's samples to the rest of its group, as bytes (safetensors and JSON: no pickle) over a
gloo group of their own (:func:`share_groups`); the others re-encode the conditioning from the same
plan (:class:`GroupMember`). See :mod:`trainer.context_parallel` for the layout."""

from __future__ import annotations

import json
from functools import partial

import torch
import torch.distributed as dist

from shared.config import Config
from trainer.context_parallel import Groups, data_rank, data_world, degree


def share_groups(cfg: Config):
    """(This process's context-parallel group, the leaders' group), on gloo with timeouts that outlast
    the leaders' longest collect (``queue.collect_timeout_s``) by 10 minutes
    (:func:`trainer.transport.patient_group`): :attr:`Groups.share` and :attr:`Groups.leaders`. A
    collective: every process creates every group."""
    from trainer.transport import patient_group

    cp, world, rank = degree(cfg), dist.get_world_size(), dist.get_rank()
    mine = None
    for first in range(0, world, cp):
        group = patient_group(cfg, list(range(first, first + cp)))
        mine = group if first == rank - rank % cp else mine
    return mine, patient_group(cfg, list(range(0, world, cp)))


def group_transport(cfg: Config, adapter, policy, algorithm, run_id: str, groups: Groups, accelerator, run_dir,
                    resume_epoch: int | None):
    """This process's transport with ``transport: celery``: a leader's :class:`ShareSamples` over a
    CeleryTransport as data rank ``rank // C`` of ``world / C`` (agreeing counts with the other leaders),
    the others' :class:`GroupMember`."""
    from trainer.transport import CeleryTransport, fewest_over

    if not groups.leader:
        return GroupMember(cfg, adapter, policy, groups, barrier=accelerator.wait_for_everyone)

    inner = CeleryTransport(cfg, adapter, policy, algorithm, run_id,
                            world_size=data_world(cfg, accelerator.num_processes),
                            rank=data_rank(cfg, accelerator.process_index), barrier=accelerator.wait_for_everyone,
                            agree=partial(fewest_over, groups.leaders),  # the smallest count over the data ranks
                            run_dir=run_dir, resume_epoch=resume_epoch)
    return ShareSamples(inner, groups)


def broadcast_bytes(kind: bytes, data: bytes | None, groups: Groups) -> tuple[bytes, bytes]:
    """``(kind, data)`` from the group's leader to every process of ``groups.share`` (the others pass
    ``data=None``), in host memory. ``kind``: one byte saying what ``data`` is."""
    import warnings

    header = torch.tensor([kind[0] if data is not None else 0, 0 if data is None else len(data)], dtype=torch.long)
    dist.broadcast(header, src=groups.src, group=groups.share)
    if data is None:
        buf = torch.empty(int(header[1]), dtype=torch.uint8)
    else:
        with warnings.catch_warnings():  # (read-only bytes: the sender's buffer is only read)
            warnings.simplefilter("ignore", UserWarning)
            buf = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    dist.broadcast(buf, src=groups.src, group=groups.share)
    return bytes([int(header[0])]), (data if data is not None else buf.numpy().tobytes())


def pack_samples(samples, state_dtype: str = "float32") -> bytes:
    """A :class:`~trainer.collect.Samples` but its conditioning (re-encoded from the plan where it
    arrives, as a resumed run does) as safetensors bytes with JSON metadata; the latent states in
    ``state_dtype`` (``train.rollout_state_dtype``: bfloat16 states are exact in it, half the bytes)."""
    from safetensors.torch import save

    from trainer.collect import samples_tensors

    meta = {"policy_versions": samples.policy_versions, "metrics": samples.metrics, "rows": samples.rows}
    return save(samples_tensors(samples, state_dtype), metadata={"flowrl": json.dumps(meta)})


def unpack_samples(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Inverse of :func:`pack_samples` but the rollout: ``(trajectory tensors, rewards, metadata)``."""
    from safetensors.torch import load

    from trainer.collect import tensors_parts

    header = int.from_bytes(data[:8], "little")  # safetensors: the header's length, then the header (JSON)
    meta = json.loads(json.loads(data[8:8 + header])["__metadata__"]["flowrl"])
    return (*tensors_parts(load(data)), meta)


#: the first byte of what a leader sends: samples follow, or the error that stopped its collect
_SAMPLES, _ERROR = b"S", b"E"


class ShareSamples:
    """A leader's transport: its CeleryTransport (``inner``), whose collected samples (or the error
    that stopped the collect) it also sends to the rest of its context-parallel group."""

    def __init__(self, inner, groups: Groups) -> None:
        self.inner, self.groups = inner, groups

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def collect(self, pending):
        try:
            samples = self.inner.collect(pending)
            payload = pack_samples(samples, self.inner.cfg.train.rollout_state_dtype)
        except Exception as e:  # the others would wait for the samples until the group's timeout
            broadcast_bytes(_ERROR, f"{type(e).__name__}: {e}".encode(), self.groups)
            raise
        broadcast_bytes(_SAMPLES, payload, self.groups)
        return samples


class GroupMember:
    """The transport of a context-parallel group's other processes with ``transport: celery``: they
    dispatch nothing; each epoch's samples come from the group's leader (:class:`ShareSamples`), the
    conditioning re-encoded here from the same plan."""

    duplicates = 0  # (the leader counts them)

    def __init__(self, cfg: Config, adapter, policy, groups: Groups, barrier) -> None:
        self.cfg, self.adapter, self.policy, self.groups = cfg, adapter, policy, groups
        barrier()  # the one in CeleryTransport.__init__: every process waits for rank 0's clearing

    def publish(self, version: int) -> None:
        if self.policy.sharded:  # every process takes part in gathering the weights rank 0 publishes
            self.policy.sampling_weights()

    def dispatch(self, plan, version: int):
        return plan

    def collect(self, plan):
        from shared.sampling import unpack_trajectory
        from trainer.collect import QUEUE_SUM, Samples
        from trainer.transport import CollectError, encode_plan, sample_device

        kind, data = broadcast_bytes(b"\0", None, self.groups)
        if kind == _ERROR:
            raise CollectError(f"the group's first process (rank {self.groups.src}) stopped collecting: "
                               f"{data.decode()}")
        trajectory, rewards, meta = unpack_samples(data)
        device = sample_device(self.cfg, self.adapter)
        roll = unpack_trajectory({k: v.to(device) for k, v in trajectory.items()})
        rows = meta["rows"]
        # counts are the leader's to report (the run's sums would count every process of the group)
        metrics = {k: (0.0 if k in QUEUE_SUM else v) for k, v in meta["metrics"].items()}
        return Samples(encode_plan(self.cfg, self.adapter, plan if rows is None else plan.subset(rows)), roll,
                       rewards, meta["policy_versions"], metrics, rows)

    def epoch_done(self, epoch: int) -> int:
        return 0

    def queue_depths(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass
