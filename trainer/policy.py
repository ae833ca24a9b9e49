"""The trainable policy and the other weights an algorithm may evaluate.

* current: the accelerate-prepared (DDP) transformer, the only forward with gradients;
* reference: the frozen base model for KL terms. With LoRA it is the same module with the
  adapters switched off (no extra memory); with full fine-tuning a frozen copy, kept only
  when ``kl_beta > 0`` or the algorithm needs it (dpo), on ``ref_param_device``;
* EMA: a float32 shadow of the trainable parameters, evaluated through
  :class:`shared.models.ParamView` (``functional_call``, no weight swapping). It provides
  the eval weights, the off-policy sampling/"old" model (DiffusionNFT) and the AWM anchor;
* snapshots: further named float32 copies an algorithm blends towards the policy itself
  (:attr:`~trainer.algorithms.base.Algorithm.snapshots`; CRD's "old" and "sampling" models),
  evaluated like the EMA, checkpointed beside it; a ``sampling`` snapshot is what rollouts use.

Under ``train.fsdp`` (:mod:`trainer.sharding`) the current model is the sharded transformer
itself, the EMA shadow and a full fine-tune's reference hold this process's pieces, and both are
evaluated through :class:`trainer.sharding.SwapView`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from typing import Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from shared.config import Config
from shared.models import Conditioning, FlowModelAdapter, ParamView
from shared.models.experts import denoiser_parts
from shared.models.lora import compile_transformer, prepare_transformer
from trainer.ema import EMA, ema_decay
from trainer.sharding import SwapView, gather, gather_like, is_sharded, local, piece_like

log = logging.getLogger("flowrl.policy")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def attach_trainable(adapter: FlowModelAdapter, cfg: Config, *, master_cast: bool = True) -> dict[str, nn.Parameter]:
    """Freeze the model, add LoRA (peft) or unfreeze all, turn on gradient checkpointing when
    ``model.gradient_checkpointing``, ``torch.compile`` it when ``model.compile``; return the
    trainable parameters (their names are the ones published to samplers). ``master_cast``
    False leaves them in the model's dtype (``train.fsdp`` casts each block as it shards it)."""
    m, transformer = cfg.model, adapter.transformer
    prepare_transformer(adapter, m)
    if m.finetune_type == "full":
        transformer.requires_grad_(True)
    if m.gradient_checkpointing:
        chosen = enable_gradient_checkpointing(transformer, m.gradient_checkpointing)
        log.info("gradient checkpointing: %s", "; ".join(f"{name} blocks {blocks}" for name, blocks in chosen.items()))
    trainable = trainable_params(transformer)
    if not trainable:
        raise ValueError(
            f"model.target_modules={m.target_modules!r} matched no layer of "
            f"{type(transformer).__name__}, so nothing would train. Fix: use 'default', 'all', "
            f"or names of its linear layers."
        )
    if master_cast:
        master = DTYPES[m.master_weight_dtype]
        for p in trainable.values():
            p.data = p.data.to(master)
    compile_transformer(adapter, m)  # model.compile: last, on the module as it will train
    return trainable


def trainable_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """``module``'s parameters that train, by name."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def checkpoint_blocks(part: nn.Module) -> list[nn.Module]:
    """One denoiser's repeated blocks in forward order: its block lists (the ``nn.ModuleList``
    children, in the order the model registers them), concatenated. FLUX.1: its 19 double-stream,
    then 38 single-stream blocks; Z-Image: its noise and context refiners, then its layers."""
    return [block for child in part.children() if isinstance(child, nn.ModuleList) for block in child]


def chosen_blocks(n: int, policy) -> list[int]:
    """Indices of the ``n`` blocks a :class:`~shared.config.CheckpointPolicy` (or ``True``) checkpoints,
    as Flow-Factory picks them: ``fraction`` f: ``k = max(1, ceil(f n))`` blocks spread evenly from
    the first to the last (``round(i (n - 1) / (k - 1))``; one: the middle block); ``every_n``:
    0, n, 2n, ...; ``layers``: those."""
    if policy is True or policy.mode == "full":
        return list(range(n))
    if policy.mode == "none" or n == 0:
        return []
    if policy.mode == "fraction":
        k = max(1, math.ceil(round(policy.fraction * n, 9)))
        return [n // 2] if k == 1 else sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    if policy.mode == "every_n":
        return list(range(0, n, policy.every_n))
    outside = [i for i in policy.layers if i >= n]
    if outside:
        raise ValueError(f"model.gradient_checkpointing.layers: {outside} are past the last block (each denoiser, "
                         f"each expert of a two-expert model, has {n}, numbered 0-{n - 1}). Fix: list indices "
                         f"below {n}.")
    return sorted(set(policy.layers))


def enable_gradient_checkpointing(transformer: nn.Module, policy=True) -> dict[str, list[int]]:
    """Recompute the chosen transformer blocks' activations in the backward pass (diffusers'
    ``enable_gradient_checkpointing``, non-reentrant ``torch.utils.checkpoint``): less activation
    memory for one more forward per block; gradients are unchanged. It acts only while gradients
    are on, so rollouts and no-grad replays run as before. ``policy``: True (every block: diffusers'
    own checkpointing) or a :class:`~shared.config.CheckpointPolicy`, applied to each denoiser (each
    expert of a two-expert model) on its own blocks (:func:`checkpoint_blocks`); the others run as
    usual. Returns the chosen indices by component."""
    if not getattr(transformer, "_supports_gradient_checkpointing", False):
        raise ValueError(
            f"model.gradient_checkpointing: {type(transformer).__name__} does not support gradient "
            f"checkpointing in this diffusers version. Fix: set model.gradient_checkpointing: false.")
    parts = denoiser_parts(transformer)
    if policy is True or policy.mode == "full":
        transformer.enable_gradient_checkpointing()
        return {name: list(range(len(checkpoint_blocks(part)))) for name, part in parts}
    chosen, selected, known = {}, set(), set()
    for name, part in parts:
        blocks = checkpoint_blocks(part)
        if not blocks:
            raise ValueError(f"model.gradient_checkpointing: {type(part).__name__} has no block list to choose "
                             f"from. Fix: use true (every block) or false.")
        chosen[name] = chosen_blocks(len(blocks), policy)
        selected |= {id(blocks[i]) for i in chosen[name]}
        known |= {id(block) for block in blocks}

    def checkpoint_chosen(block, *args):
        if id(block) in selected:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        if id(block) not in known:
            raise RuntimeError(f"model.gradient_checkpointing: {type(transformer).__name__} checkpoints "
                               f"{type(block).__name__}, which is not one of its listed blocks, so a selective "
                               f"policy cannot place it. Fix: use true (every block) or false for this model.")
        return block(*args)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_chosen)
    return chosen


class Policy:
    """Velocity evaluations under the weights each algorithm needs (see module docstring)."""

    def __init__(self, adapter: FlowModelAdapter, model: nn.Module, cfg: Config,
                 trainable: dict[str, nn.Parameter], snapshots: tuple[str, ...] = ()) -> None:
        self.adapter, self.model, self.cfg = adapter, model, cfg
        self.trainable = trainable
        self.sharded = any(is_sharded(p) for p in trainable.values())  # train.fsdp
        self.guidance_scale = cfg.train.guidance_scale
        self.ref_guidance_scale = cfg.train.reference_guidance_scale
        t = cfg.train
        self.ema = None
        if t.ema_decay:
            device = "cpu" if t.ema_device == "cpu" else None
            self.ema = EMA(self._pieces(), device=device)
        # named copies of the starting weights (on ref_param_device), blended by the algorithm
        snap_device = "cpu" if t.ref_param_device == "cpu" else None
        self.snapshots = {name: EMA(self._pieces(), device=snap_device) for name in snapshots}
        self.optimizer_step = 0  # the loop sets it on resume; update_ema after every step
        self._ref: nn.Module | None = None
        if t.uses_reference and cfg.model.finetune_type == "full":
            ref_device = "cpu" if t.ref_param_device == "cpu" else next(model.parameters()).device
            if self.sharded:  # this process's pieces of the frozen weights, swapped in per call
                pieces = {n: p.detach().clone().to(ref_device) for n, p in self._pieces().items()}
                self._ref = SwapView(adapter.transformer, trainable, pieces)
            else:
                self._ref = copy.deepcopy(adapter.transformer).requires_grad_(False).to(ref_device)

    def frozen_copies(self) -> list[nn.Module]:
        """Modules of their own that run forwards besides the transformer: a full fine-tune's frozen
        reference copy (``train.context_parallel`` splits its forwards too)."""
        return [self._ref] if self._ref is not None and not isinstance(self._ref, SwapView) else []

    def _pieces(self) -> dict[str, torch.Tensor]:
        """The trainable parameters as this process holds them (pieces under FSDP), detached."""
        return {n: local(p.detach()) for n, p in self.trainable.items()}

    # -------------------------------------------------------------- modules
    def _view(self, shadow: EMA) -> nn.Module:
        """The transformer under ``shadow``'s weights (the EMA or a snapshot; no copy into the module)."""
        if self.sharded:
            return SwapView(self.adapter.transformer, self.trainable, shadow.as_params(self._pieces()))
        return ParamView(self.adapter.transformer, shadow.as_params(self.trainable))

    def ema_view(self) -> nn.Module:
        assert self.ema is not None
        return self._view(self.ema)

    def snapshot_view(self, name: str) -> nn.Module:
        """The transformer under snapshot ``name``'s weights (no copy into the module)."""
        return self._view(self.snapshots[name])

    def blend_snapshot(self, name: str, decay: float) -> None:
        """``snapshot <- decay * snapshot + (1 - decay) * policy`` (0 copies the policy, 1 keeps it)."""
        self.snapshots[name].update(self._pieces(), decay)

    def samples_from_ema(self) -> bool:
        """Whether rollouts (and the "old" policy) use the EMA: ``train.off_policy``, or
        ``train.sample_from_ema_after`` optimizer steps done."""
        t = self.cfg.train
        after = t.sample_from_ema_after
        return self.ema is not None and bool(t.off_policy or (after is not None and self.optimizer_step >= after))

    def sampling_module(self) -> nn.Module:
        """Weights rollouts use: a ``sampling`` snapshot if the algorithm keeps one, the EMA when
        :meth:`samples_from_ema`, else the current ones."""
        if "sampling" in self.snapshots:
            return self.snapshot_view("sampling")
        if self.samples_from_ema():
            return self.ema_view()
        return self.adapter.transformer

    def eval_module(self) -> nn.Module:
        return self.ema_view() if self.ema is not None else self.adapter.transformer

    @contextlib.contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        if self._ref is not None:
            yield self._ref
            return
        transformer = self.adapter.transformer
        transformer.disable_adapters()
        try:
            yield transformer
        finally:
            transformer.enable_adapters()

    # -------------------------------------------------------------- velocities
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Current policy, with gradients (through the DDP wrapper)."""
        return self.adapter.velocity(x, sigma, cond, self.guidance_scale, transformer=self.model)

    @torch.no_grad()
    def ref_velocity(self, x, sigma, cond) -> torch.Tensor:
        """The frozen base's velocity at ``train.ref_guidance_scale`` (default: the policy's CFG): the KL anchor."""
        return self._ref_velocity(x, sigma, cond, self.ref_guidance_scale)

    @torch.no_grad()
    def base_velocity(self, x, sigma, cond) -> torch.Tensor:
        """The frozen base's velocity at the policy's own CFG scale: the starting policy, which preference
        losses (dpo, dgpo) compare the policy with, whatever ``train.ref_guidance_scale`` anchors the KL to."""
        return self._ref_velocity(x, sigma, cond, self.guidance_scale)

    def _ref_velocity(self, x, sigma, cond, guidance_scale: float) -> torch.Tensor:
        with self._reference() as module:
            device = next(iter(self.trainable.values())).device if self.sharded else next(module.parameters()).device
            v = self.adapter.velocity(x.to(device), sigma.to(device), cond.to(device),
                                      guidance_scale, transformer=module)
        return v.to(x.device)

    @torch.no_grad()
    def old_velocity(self, x, sigma, cond) -> torch.Tensor:
        """The sampling ("old") policy (:meth:`sampling_module`: a ``sampling`` snapshot, the EMA if
        off-policy, else the current weights), no grad."""
        return self.adapter.velocity(x, sigma, cond, self.guidance_scale,
                                     transformer=self.sampling_module())

    @torch.no_grad()
    def frozen_velocity(self, module: nn.Module, x, sigma, cond) -> torch.Tensor:
        """``module``'s velocity (e.g. a :meth:`snapshot_view`, built once for many calls) at the policy's
        CFG scale, no grad."""
        return self.adapter.velocity(x, sigma, cond, self.guidance_scale, transformer=module)

    def ema_velocity(self, x, sigma, cond) -> torch.Tensor:
        return self.frozen_velocity(self.ema_view(), x, sigma, cond)

    # -------------------------------------------------------------- EMA
    def ema_is_sampling(self) -> bool:
        """Whether the EMA is the policy rollouts draw from (and the algorithm's "old" policy): then it
        must not move under samples it drew until their epoch's training ends (:meth:`update_ema`)."""
        return "sampling" not in self.snapshots and self.samples_from_ema()

    def update_ema(self, optimizer_step: int, *, since: int | None = None) -> float | None:
        """Called after each optimizer step; returns the decay used (None if skipped).

        ``since``: the step count before a run of steps whose updates were held back (the EMA drew the
        epoch's samples, :meth:`ema_is_sampling`; trainer.loop.optimize calls this once at the epoch's end
        as DiffusionNFT moves its "old" model once an iteration): one update at ``optimizer_step``'s decay
        if those steps passed a multiple of ``train.ema_update_interval``."""
        t = self.cfg.train
        self.optimizer_step = optimizer_step
        k = t.ema_update_interval
        due = optimizer_step % k == 0 if since is None else optimizer_step // k > since // k
        if self.ema is None or not due:
            return None
        decay = ema_decay(optimizer_step, t.ema_decay_schedule, t.ema_decay,
                          initial_decay=t.initial_decay, warmup_steps=t.ema_warmup_steps,
                          total_steps=t.total_steps, flat_steps=t.flat_steps,
                          ramp_rate=t.ramp_rate)
        self.ema.update(self._pieces(), decay)
        return decay

    # -------------------------------------------------------------- whole tensors
    def full_weights(self, ema: bool = False, snapshot: str | None = None) -> dict[str, torch.Tensor]:
        """The trainable parameters (or their EMA, or snapshot ``snapshot``) as whole tensors, by
        name. A collective under FSDP (every process calls it); otherwise references, no copy."""
        if ema or snapshot is not None:
            shadow = self.snapshots[snapshot] if snapshot is not None else self.ema
            assert shadow is not None
            return {n: gather_like(s, self.trainable[n]) for n, s in shadow.shadow.items()}
        return {n: gather(p.detach()) for n, p in self.trainable.items()}

    def sampling_weights(self) -> dict[str, torch.Tensor]:
        """The whole tensors rollouts sample with (:meth:`sampling_module`'s): what the trainer publishes."""
        if "sampling" in self.snapshots:
            return self.full_weights(snapshot="sampling")
        return self.full_weights(ema=self.samples_from_ema())

    def _load_shadow(self, shadow: EMA, tensors: dict[str, torch.Tensor]) -> None:
        """Set ``shadow`` from whole tensors (this process's pieces of them under FSDP)."""
        shadow.load_state_dict({n: piece_like(v, self.trainable[n]) if n in self.trainable else v
                                for n, v in tensors.items()})

    def load_snapshot(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Set snapshot ``name`` from whole tensors (a checkpoint's ``snapshot-<name>.safetensors``)."""
        self._load_shadow(self.snapshots[name], tensors)

    def load_ema(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the EMA shadow from whole tensors (a checkpoint's ``ema.safetensors``)."""
        assert self.ema is not None
        self._load_shadow(self.ema, tensors)
