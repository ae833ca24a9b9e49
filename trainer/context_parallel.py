"""Context (sequence) parallelism, ``train.context_parallel: C``: each sample's video tokens are split
over ``C`` processes that run it together, through diffusers' own Ulysses attention
(``ModelMixin.enable_parallelism`` with the model's ``_cp_plan``; Wan's splits the tokens after the
patch embedding and gathers them at ``proj_out``).

Layout: ``W`` processes form ``W / C`` data-parallel ranks; process ``p`` is data rank ``p // C``
and context rank ``p % C``. The ``C`` processes of a data rank roll out, score, train and evaluate
the same samples with the same seeds; inside each transformer forward, each holds ``1 / C`` of the
tokens (and, inside attention, all tokens of ``1 / C`` of the heads), which is what lets a long
video's activations fit.

Gradients: every process of a group computes the same loss from the same gathered output, but the
parameter gradient it gets holds only its own tokens' share, so the group's true gradient is their
SUM. DDP (and FSDP's reduce-scatter) averages over all ``W`` processes, i.e. ``sum / (D C)``, so the
loss is scaled by ``C``
(:func:`loss_scale`) to give the mean over the ``D`` data ranks of whole gradients, as without
context parallelism.

Gathers over processes (rewards for advantages) keep one copy per data rank (:func:`one_per_group`);
reductions of ``(sum, count)`` pairs and means need nothing (each group counts ``C`` times). With
``transport: celery`` a group's first process talks to the queue for it (:mod:`trainer.cp_queue`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from shared.config import Config
from shared.models.experts import denoiser_parts


def degree(cfg: Config) -> int:
    """``train.context_parallel`` (1: off)."""
    return int(cfg.train.context_parallel)


def data_rank(cfg: Config, rank: int) -> int:
    """The data-parallel rank of process ``rank``: the processes of one group share it."""
    return rank // degree(cfg)


def data_world(cfg: Config, world: int) -> int:
    """How many data-parallel ranks ``world`` processes form."""
    return world // degree(cfg)


def loss_scale(cfg: Config) -> int:
    """The factor on each process's loss that makes DDP's average over all processes the mean of the
    data ranks' whole gradients (see the module docstring)."""
    return degree(cfg)


def one_per_group(gathered: torch.Tensor, world: int, cp: int) -> torch.Tensor:
    """``gathered``: ``[world * n, ...]``, every process's ``[n, ...]`` in rank order (accelerate's
    ``gather``). Returns ``[world / cp * n, ...]``: the first process's of each context-parallel
    group (the others hold the same), in data-rank order."""
    if cp == 1:
        return gathered
    n = gathered.shape[0] // world
    return gathered.reshape(world, n, *gathered.shape[1:])[::cp].reshape(-1, *gathered.shape[1:])


def check(cfg: Config, adapter: Any, world: int) -> None:
    """Fail before any rollout when ``train.context_parallel`` cannot run here; the error names the
    fix. Needs a video family whose transformer diffusers can split (``_cp_plan``), heads divisible by
    ``C`` (Ulysses gives each process ``heads / C`` of them), and every rollout's token count (train
    and eval resolution and frames) divisible by ``C``."""
    from shared.sampling import as_hw

    cp = degree(cfg)
    if cp == 1:
        return
    if world % cp:
        cfg.geometry(world)  # raises the ConfigError that names the fix
    if not getattr(adapter, "video", False):
        raise ValueError(
            f"train.context_parallel: {cp} splits a video's tokens over processes; model_type "
            f"{adapter.model_type} generates images, whose sequence fits one GPU. Fix: train.context_parallel: 1 "
            f"(data parallelism over the processes).")
    backend = cfg.model.attn_backend
    if backend is not None:  # (unset: diffusers' native dispatch, which splits)
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        splitting = sorted(getattr(_AttentionBackendRegistry, "_supports_context_parallel", ()))
        if splitting and backend not in splitting:
            raise ValueError(
                f"train.context_parallel: {cp} needs an attention backend diffusers can split over processes, "
                f"but model.attn_backend is {backend!r}. Fix: one of {', '.join(splitting)} (or leave it unset).")
    for name, transformer in denoiser_parts(adapter.transformer):
        if getattr(type(transformer), "_cp_plan", None) is None:
            raise ValueError(
                f"train.context_parallel: {cp}: the {name} ({type(transformer).__name__}) has no context-parallel "
                f"plan in this diffusers version. Fix: train.context_parallel: 1.")
        heads = int(transformer.config.num_attention_heads)
        if heads % cp:
            raise ValueError(
                f"train.context_parallel: {cp} does not divide the {heads} attention heads of the {name}: Ulysses "
                f"gives each process heads / {cp} of them. Fix: a divisor of {heads}.")
    from trainer.evaluate import eval_settings

    patch = [int(x) for x in adapter.transformer.config.patch_size]
    rollouts = [("train", as_hw(cfg.train.resolution), cfg.train.num_frames),
                ("eval", as_hw(cfg.eval.resolution), cfg.eval.num_frames)]
    rollouts += [(f"data.datasets[{src.name}].eval", eval_settings(cfg, src.name).resolution, cfg.eval.num_frames)
                 for src in cfg.data.datasets or []]
    for key, res, frames in rollouts:
        shape = adapter.sample_shape(res, frames)  # [C, F', h, w]
        tokens = 1
        for size, p in zip(shape[1:], patch):
            tokens *= size // p
        if tokens % cp:
            raise ValueError(
                f"train.context_parallel: {cp} does not divide the {tokens} tokens of a {key} rollout "
                f"({key}.resolution {res}, {shape[1]} latent frames: {shape[1] // patch[0]} x "
                f"{shape[2] // patch[1]} x {shape[3] // patch[2]} patches), which are split evenly over the "
                f"processes. Fix: a resolution or num_frames whose token count {cp} divides, or another "
                f"context_parallel.")


@dataclasses.dataclass(frozen=True)
class Groups:
    """This process's process groups under context parallelism: ``cp``, its group's ``C`` processes
    (the first, global rank ``src``, is the group's ``leader``); ``data``, the processes with its
    context rank, one per data rank (for a leader: the leaders, who talk to the queue); ``share``
    (``transport: celery``): its group again, on gloo (host memory) with a timeout longer than
    ``queue.collect_timeout_s``, over which the leader sends each epoch's samples: the others wait
    in it for as long as the leader collects; ``leaders`` (``transport: celery``): the leaders, on gloo
    with as long a timeout, over which they agree on what they collected."""

    cp: Any
    data: Any
    src: int
    leader: bool
    share: Any = None
    leaders: Any = None


def enable(cfg: Config, modules: list[torch.nn.Module], device_type: str) -> Groups | None:
    """Split every forward of ``modules`` (transformers, e.g. the policy's and a full fine-tune's
    frozen reference; both experts of Wan2.2-A14B) over the context-parallel groups; one on another
    device than ``device_type`` (a reference copy on the CPU) is left whole. A collective:
    every process calls it, with the same modules in the same order. Call it after LoRA is attached
    (peft may replace ``proj_out``, where the output is gathered)."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    cp = degree(cfg)
    if cp == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    # (data, ring, ulysses): each process's ulysses group is the cp consecutive processes of its data rank
    mesh = init_device_mesh(device_type, (world // cp, 1, cp), mesh_dim_names=("data", "ring", "ulysses"))
    cp_mesh = mesh["ring", "ulysses"]
    for module in modules:
        if next(module.parameters()).device.type != device_type:
            continue  # a reference copy kept on the CPU (ref_param_device: cpu) runs whole: NCCL takes GPU tensors only
        for _, transformer in denoiser_parts(module):
            config = ContextParallelConfig(ulysses_degree=cp, mesh=cp_mesh)
            if device_type == "cpu":
                # diffusers takes the device as rank % the accelerator count, which is 0 on a CPU-only
                # machine (the tests run there on gloo): resolve the same config with the CPU device
                resolved = ParallelConfig(context_parallel_config=config)
                resolved.setup(rank, world, torch.device("cpu"), mesh=cp_mesh)

                def resolve(_config, transformer=transformer, resolved=resolved):
                    transformer._parallel_config = resolved
                    return resolved

                transformer._resolve_parallel_config = resolve
            transformer.enable_parallelism(config=config)
    from trainer.cp_queue import share_groups

    share, leaders = share_groups(cfg) if cfg.transport == "celery" else (None, None)
    return Groups(cp=mesh.get_group("ulysses"), data=mesh.get_group("data"), src=rank - rank % cp,
                  leader=rank % cp == 0, share=share, leaders=leaders)
