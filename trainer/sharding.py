"""Sharded data parallelism, ``train.fsdp: true``: PyTorch FSDP2 (``fully_shard``).

Under DDP every process holds the whole transformer, its gradients and AdamW moments (about 16
bytes a trained parameter in float32). With ``train.fsdp`` each of the ``N`` processes keeps
``1/N`` of every parameter (frozen and trained), of the gradients and of the optimizer state;
each transformer block is all-gathered just before it runs and freed after it
(``train.fsdp_reshard_after_forward``), and gradients are reduce-scattered. The arithmetic is
the same as DDP's (gradients averaged over processes), so a run's trajectory is DDP's up to
float rounding.

Conventions:
    * Parameters keep their names (``fully_shard`` wraps no module), so LoRA files, EMA files,
      published weights and optimizer checkpoints have the same keys as under DDP, and hold FULL
      tensors: a checkpoint written under FSDP resumes under DDP and the other way round, on any
      number of processes.
    * A sharded parameter is a ``DTensor``; :func:`local` is this process's piece and
      :func:`gather` the whole tensor (a collective: every process must call it, in the same
      order).
    * The EMA shadow and a full fine-tune's frozen reference are kept as local pieces, and are
      evaluated by :class:`SwapView` (copy in, forward, copy back). ``ParamView``'s
      ``functional_call`` cannot work here: FSDP re-installs the all-gathered parameters on every
      forward, so substituted ones would be silently ignored.
    * Every process must run the same number of forwards (each one all-gathers): evaluation pads
      the processes' shares to equal length (:func:`equal_share`), and a two-expert model runs each
      expert any process needs on every process (:func:`agree_on_experts`).
    * ``train.fsdp_shard_size`` shards within groups of processes and replicates across them
      (hybrid sharding, :func:`device_mesh`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's piece of a sharded tensor (the tensor itself when not sharded)."""
    return t.to_local() if is_sharded(t) else t


def gather(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (collective; in its own storage, which safetensors needs:
    an all-gather can return a view into a larger buffer), else ``t``."""
    return t.full_tensor().clone() if is_sharded(t) else t


def gather_like(piece: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose piece on this process is ``piece``, sharded the way ``param`` is
    (collective); ``piece`` itself when ``param`` is not sharded. For EMA shadows and optimizer
    moments, which are kept as local pieces."""
    if not is_sharded(param):
        return piece
    from torch.distributed.tensor import DTensor

    dt = DTensor.from_local(piece.to(param.device), param.device_mesh, param.placements,
                            shape=param.shape, stride=param.stride(), run_check=False)
    return dt.full_tensor().clone()


def shard_like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``whole`` as a ``DTensor`` sharded the way ``param`` is (no communication: every process has
    ``whole``; each keeps its piece); ``whole`` itself when ``param`` is not sharded."""
    if not is_sharded(param):
        return whole
    from torch.distributed.tensor import distribute_tensor

    if tuple(whole.shape) != tuple(param.shape):
        raise ValueError(f"a saved tensor of shape {tuple(whole.shape)} does not fit a parameter of "
                         f"shape {tuple(param.shape)}. Fix: resume with the same model: section.")
    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def piece_like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This process's piece of ``whole`` under ``param``'s sharding (see :func:`shard_like`)."""
    return local(shard_like(whole, param))


# ---------------------------------------------------------------------------- setting up

def check_fsdp(cfg: Any, adapter: Any, world_size: int) -> None:
    """Refuse the combinations ``train.fsdp`` does not support, each with the fix."""
    t, m = cfg.train, cfg.model
    if world_size < 2:
        raise ValueError("train.fsdp shards the model over processes, and this run has one. Fix: "
                         "`flowrl train CONFIG --processes N` (N >= 2 GPUs; `auto`: all visible), or "
                         "`accelerate launch --multi_gpu --num_processes N -m trainer.cli train ...`, "
                         "or set train.fsdp: false.")
    if t.mixed_precision == "fp16":
        raise ValueError("train.fsdp with mixed_precision: fp16 is not supported (its gradient scaler "
                         "does not handle sharded gradients). Fix: train.mixed_precision: bf16.")
    if m.compile:
        raise ValueError("train.fsdp with model.compile is not supported. Fix: set model.compile: false, "
                         "or train.fsdp: false.")
    if t.fsdp_shard_size is not None and (t.fsdp_shard_size > world_size or world_size % t.fsdp_shard_size):
        raise ValueError(f"train.fsdp_shard_size={t.fsdp_shard_size} does not divide the {world_size} processes "
                         f"into equal shard groups. Fix: the number of GPUs per node (a divisor of "
                         f"{world_size}), or null to shard over all of them.")


def blocks_of(transformer: nn.Module) -> list[nn.Module]:
    """The units to shard one by one: the model's ``_no_split_modules`` classes (diffusers names
    its transformer blocks there, as accelerate's transformer-based FSDP wrapping reads them; both
    experts' for a two-expert model), else the members of its ``nn.ModuleList`` children."""
    names = {n for m in transformer.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    if not blocks:
        blocks = [b for child in transformer.children() if isinstance(child, nn.ModuleList) for b in child]
    return blocks


def device_mesh(device_type: str, world_size: int, shard_size: int | None):
    """``None`` (``fully_shard``'s default: shard over every process), or for hybrid sharding the 2-D
    mesh ``(world_size / shard_size replicas) x (shard_size shards)``: each group of ``shard_size``
    consecutive processes holds one copy, sharded; the copies are kept equal by averaging gradients."""
    if shard_size is None or shard_size == world_size:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size // shard_size, shard_size),
                            mesh_dim_names=("replicate", "shard"))


def shard_transformer(transformer: nn.Module, *, reshard_after_forward: bool = True,
                      master_dtype: torch.dtype | None = None, mesh=None) -> int:
    """``fully_shard`` each block of ``transformer``, then the rest of it (in place; parameter names
    are unchanged). Needs the process group (``accelerate launch``). ``master_dtype``: the dtype of
    the trainable parameters, cast one block at a time just before it is sharded, so a whole
    float32 copy of the model never exists (hold no other reference to the parameters, or their
    whole tensors stay alive). ``mesh``: :func:`device_mesh`'s (hybrid sharding). Returns the number
    of blocks."""
    from torch.distributed.fsdp import fully_shard

    def cast(module: nn.Module) -> None:
        if master_dtype is not None:
            for p in module.parameters():
                if p.requires_grad and p.dtype != master_dtype:
                    p.data = p.data.to(master_dtype)

    from shared.models.experts import denoiser_parts

    blocks = blocks_of(transformer)
    for block in blocks:
        cast(block)
        fully_shard(block, reshard_after_forward=reshard_after_forward, mesh=mesh)
    for _, part in denoiser_parts(transformer):  # each expert of a two-expert model is a unit too
        if part is not transformer:
            cast(part)
            fully_shard(part, reshard_after_forward=reshard_after_forward, mesh=mesh)
    cast(transformer)  # what no block holds (embeddings, final norm and projection)
    fully_shard(transformer, reshard_after_forward=reshard_after_forward, mesh=mesh)
    return len(blocks)


def agree_on_experts(need: torch.Tensor) -> torch.Tensor:
    """``need`` (``[2]`` int, this process) maxed over the processes: the experts some process needs
    (:attr:`shared.models.experts.TwoExperts.agree` under ``train.fsdp``)."""
    import torch.distributed as dist

    need = need.clone()
    dist.all_reduce(need, op=dist.ReduceOp.MAX)
    return need


def model_class(module: nn.Module) -> type:
    """The module's own class (``fully_shard`` swaps in a subclass named ``FSDP<class>``)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        return next(b for b in cls.__bases__ if b is not FSDPModule)
    return cls


def refresh(module: nn.Module) -> None:
    """Drop every all-gathered parameter of ``module`` still held from an earlier forward (the root
    keeps its own after a forward with no backward), so the next forward all-gathers the current
    pieces. Needed after the pieces change outside an optimizer step."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def param_bytes(module: nn.Module) -> int:
    """Bytes of parameters this process holds for ``module`` (its pieces when sharded)."""
    return sum(local(p).numel() * p.element_size() for p in module.parameters())


class SwapView(nn.Module):
    """Call a sharded ``module`` with some parameters replaced by ``pieces`` (this process's
    pieces, e.g. the EMA shadow), by copying them in for the call and the live pieces back after.
    No-grad only (the swap is an in-place write)."""

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter],
                 pieces: dict[str, torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_module", module)  # not registered: no double counting
        self._params, self._pieces = params, pieces

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError("SwapView runs without gradients only (EMA / reference weights); call it "
                               "under torch.no_grad().")
        live = {}
        for name, piece in self._pieces.items():
            target = local(self._params[name])
            live[name] = target.clone()
            target.copy_(piece)
        refresh(self._module)
        try:
            return self._module(*args, **kwargs)
        finally:
            for name, saved in live.items():
                local(self._params[name]).copy_(saved)
            refresh(self._module)


def equal_share(mine: list[int], counts: list[int]) -> list[int]:
    """``mine`` padded with its last entry (or ``0``) to the longest of ``counts`` (every
    process's share length), so every process runs the same forwards; the caller drops the
    results past ``len(mine)``."""
    longest = max(counts)
    return mine + [mine[-1] if mine else 0] * (longest - len(mine))
