"""Preparing an adapter's transformer for training or for receiving trained weights.

Trainer and samplers call the same function, so a sampler's transformer has exactly the
parameter names (``...lora_A.default.weight``) of the trainer's, and published weights copy
over by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shared.models.base import FlowModelAdapter


def prepare_transformer(adapter: FlowModelAdapter, model_cfg: Any) -> None:
    """Freeze the transformer, select the attention backend (``model.attn_backend``,
    :func:`shared.models.attention.apply_attention_backend`: errors name the fix), and add LoRA
    (peft) when ``model_cfg.finetune_type == "lora"`` (rank, alpha = ``2 * rank`` unless set, targets)."""
    from shared.models.attention import apply_attention_backend

    transformer = adapter.transformer
    transformer.requires_grad_(False)
    apply_attention_backend(transformer, getattr(model_cfg, "attn_backend", None),
                            masked=adapter.model_type if adapter.attention_mask else None)
    if model_cfg.finetune_type == "lora":
        transformer.add_adapter(lora_config(type(adapter), model_cfg))


def lora_config(adapter_cls: type[FlowModelAdapter], model_cfg: Any):
    """The peft ``LoraConfig`` of ``model:`` (rank, alpha = ``2 * rank`` unless set, the family's
    targets for ``default``)."""
    from peft import LoraConfig

    rank = model_cfg.lora_rank
    return LoraConfig(r=rank, lora_alpha=model_cfg.lora_alpha or 2 * rank, init_lora_weights="gaussian",
                      target_modules=adapter_cls.lora_targets(model_cfg.target_modules))


def compile_transformer(adapter: FlowModelAdapter, model_cfg: Any) -> bool:
    """``model.compile``: ``torch.compile`` each denoiser module of ``adapter`` in place
    (``nn.Module.compile``: the module keeps its parameters and their names, so LoRA checkpoints,
    EMA views and published weights are untouched; both experts of a two-expert model), with static
    shapes. The first calls compile (minutes for a real-size model; logged by the caller's timing).
    Returns whether it compiled."""
    from shared.models.experts import denoiser_parts

    mode = getattr(model_cfg, "compile", False)
    if not mode:
        return False
    for _, module in denoiser_parts(adapter.transformer):
        # static shapes: a run has a few fixed batch shapes (rollout, training, evaluation), each
        # gets its own specialised graph; with automatic dynamic shapes the second shape seen would
        # turn the batch dimension symbolic for every later graph (e.g. a small evaluation batch
        # first, then the rollout's)
        module.compile(mode=None if mode is True or mode == "default" else mode, dynamic=False)
    return True


@torch.no_grad()
def load_named_parameters(module: nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """Copy ``tensors`` into ``module``'s parameters of the same names (in place, keeping each
    parameter's dtype and device). Returns how many were copied.

    Raises:
        KeyError: a name the module does not have (the weights belong to another model or
        another LoRA configuration), or a shape mismatch.
    """
    params = dict(module.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise KeyError(f"{len(missing)} published parameter(s) are not in this "
                       f"{type(module).__name__}, e.g. {missing[:3]}. Fix: give the sampler the "
                       f"same model: section (model, finetune_type, lora_rank, target_modules) "
                       f"as the trainer.")
    for name, value in tensors.items():
        p = params[name]
        if p.shape != value.shape:
            raise KeyError(f"parameter {name}: published shape {tuple(value.shape)} != "
                           f"{tuple(p.shape)} here. Fix: the same model: section on both sides.")
        p.copy_(value.to(device=p.device, dtype=p.dtype))
    return len(tensors)
