"""What a training run keeps on each GPU, by arithmetic: ``flowrl check CONFIG --memory``.

Counts the transformer's parameters on the meta device (no weights are read or allocated: the
architecture comes from ``transformer/config.json``), adds the run's LoRA, and adds up the
persistent state per process: the frozen weights (``model.options.transformer_dtype``), the
trained weights in ``model.master_weight_dtype`` with their gradients, AdamW's two float32 moments,
the float32 EMA (unless ``train.ema_device: cpu``), a full fine-tune's KL reference copy and an
algorithm's float32 snapshots of the trained weights (crd's two; both unless
``train.ref_param_device: cpu``), each divided over the processes under ``train.fsdp`` (over
``train.fsdp_shard_size`` of them with hybrid sharding), which then also holds one gathered block at
a time. Not counted: activations (they scale with the batch and
resolution, see ``model.gradient_checkpointing``), text encoders, the VAE, reward models, the CUDA
context and the allocator's slack; measured peaks are in docs/models.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from trainer.algorithms import ALGORITHMS

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Parameters of a denoiser (both experts of a two-expert model), by role."""

    frozen: int  # not trained (the base under LoRA; 0 for a full fine-tune)
    trained: int  # LoRA weights, or every weight
    largest_block: int  # parameters of the largest FSDP unit (a transformer block)


def count_params(transformer: nn.Module) -> ParamCounts:
    """``ParamCounts`` of a (meta-device) transformer whose trainable parameters are marked."""
    from trainer.sharding import blocks_of

    frozen = sum(p.numel() for p in transformer.parameters() if not p.requires_grad)
    trained = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    blocks = blocks_of(transformer)
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=frozen + trained)
    return ParamCounts(frozen, trained, largest)


def plan_bytes(counts: ParamCounts, *, world_size: int, fsdp: bool, frozen_dtype: str, master_dtype: str,
               ema: bool, ema_on_gpu: bool, ref_copy: bool, ref_on_gpu: bool, snapshots: int = 0,
               snapshots_on_gpu: bool = True) -> dict[str, int]:
    """Bytes per process of each kind of persistent state (see the module docstring).

    ``frozen_dtype``: the frozen weights' dtype; ``master_dtype``: the trained weights' (their
    gradients too); ``ref_copy``: a full fine-tune's frozen KL reference (all weights, master dtype);
    ``snapshots``: how many float32 copies of the trained weights the algorithm keeps (crd: 2).
    Under ``fsdp`` every kind is split over ``world_size`` processes, plus ``gathered_block``: the
    largest block, whole, while it runs. Returns the parts and their ``total``.
    """
    share = world_size if fsdp else 1
    frozen_b, master_b = DTYPE_BYTES[frozen_dtype], DTYPE_BYTES[master_dtype]
    parts = {
        "frozen_weights": counts.frozen * frozen_b // share,
        "trained_weights": counts.trained * master_b // share,
        "gradients": counts.trained * master_b // share,
        "adam_moments": counts.trained * 8 // share,
        "ema": counts.trained * 4 // share if ema and ema_on_gpu else 0,
        "snapshots": counts.trained * 4 * snapshots // share if snapshots_on_gpu else 0,
        "kl_reference": (counts.frozen + counts.trained) * master_b // share if ref_copy and ref_on_gpu else 0,
        "gathered_block": counts.largest_block * max(frozen_b, master_b) if fsdp else 0,
    }
    parts["total"] = sum(parts.values())
    return parts


def meta_transformer(model_cfg: Any) -> nn.Module:
    """The run's transformer (both experts for Wan2.2-A14B) on the meta device, read from
    ``{model_name_or_path}/transformer/config.json`` (a local folder, or the hub's file when it can be
    fetched), with the run's LoRA or all weights trainable."""
    import json
    from pathlib import Path

    import diffusers

    path = model_cfg.model_name_or_path
    if path is None:
        raise ValueError("flowrl check --memory needs model.model_name_or_path (the tiny model has no "
                         "transformer/config.json). Fix: point it at a pipeline folder or a hub id.")

    def config_of(sub: str) -> dict | None:
        local = Path(path) / sub / "config.json"
        if local.is_file():
            return json.loads(local.read_text())
        if Path(path).exists():
            return None
        from huggingface_hub import hf_hub_download

        try:
            return json.loads(Path(hf_hub_download(path, f"{sub}/config.json")).read_text())
        except Exception as e:  # noqa: BLE001 - the hub's errors differ by version; all mean "cannot read"
            if sub != "transformer":
                return None
            raise ValueError(f"cannot read {path}/{sub}/config.json ({type(e).__name__}: {e}). Fix: download "
                             f"the model (or just its transformer/config.json) and point "
                             f"model.model_name_or_path at the folder.") from e

    parts = []
    for sub in ("transformer", "transformer_2"):
        config = config_of(sub)
        if config is None:
            if sub == "transformer":
                raise ValueError(f"{path} has no transformer/config.json. Fix: point model.model_name_or_path "
                                 f"at a diffusers pipeline folder.")
            continue
        cls = getattr(diffusers, config["_class_name"])
        with torch.device("meta"):
            parts.append(cls.from_config(config))
    module = parts[0] if len(parts) == 1 else nn.ModuleDict({"transformer": parts[0], "transformer_2": parts[1]})
    module.requires_grad_(model_cfg.finetune_type == "full")
    if model_cfg.finetune_type == "lora":  # the trainer's LoRA (shared.models.lora.prepare_transformer)
        from shared.models import MODELS
        from shared.models.lora import lora_config

        lora = lora_config(MODELS.get(model_cfg.model_type), model_cfg)
        for part in parts:
            part.add_adapter(lora)
    return module


def memory_report(cfg: Any, world_size: int) -> dict[str, Any]:
    """The plan of ``cfg`` on ``world_size`` processes: parameter counts and GiB per process, by part."""
    t, m = cfg.train, cfg.model
    counts = count_params(meta_transformer(m))
    frozen_dtype = (m.options.get("transformer_dtype") or "float32")
    shards = min(t.fsdp_shard_size or world_size, world_size)  # hybrid sharding: within a group
    parts = plan_bytes(counts, world_size=shards, fsdp=t.fsdp, frozen_dtype=frozen_dtype,
                       master_dtype=m.master_weight_dtype, ema=bool(t.ema_decay), ema_on_gpu=t.ema_device != "cpu",
                       ref_copy=t.uses_reference and m.finetune_type == "full", ref_on_gpu=t.ref_param_device != "cpu",
                       snapshots=len(ALGORITHMS.get(t.trainer_type)(cfg).snapshots),
                       snapshots_on_gpu=t.ref_param_device != "cpu")
    return {"world_size": world_size, "fsdp": t.fsdp, "params": dataclasses.asdict(counts),
            "gib_per_process": {k: round(v / GIB, 2) for k, v in parts.items()}, "bytes_per_process": parts,
            "not_counted": "activations, text encoders, VAE, reward models, CUDA context"}
