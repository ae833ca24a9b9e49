"""Checkpoints a user can load elsewhere.

* LoRA: ``lora/pytorch_lora_weights.safetensors`` in diffusers' pipeline LoRA format (PEFT
  ``lora_A``/``lora_B`` keys and the ``LoraConfig`` metadata, prefixed ``transformer.``),
  loadable with a pipeline's ``load_lora_weights(dir)`` or
  ``transformer.load_lora_adapter(dir, use_safetensors=True)``;
* full fine-tune: ``transformer/`` via ``save_pretrained``;
* two experts (Wan2.2-A14B, :mod:`shared.models.experts`): the low-noise expert's LoRA in
  ``lora_2/`` (same format, loaded with ``load_lora_weights(dir, load_into_transformer_2=True)``),
  or its full weights in ``transformer_2/``;
* ``ema.safetensors``: the EMA shadow of the trainable parameters (the eval weights);
* ``snapshot-<name>.safetensors``: an algorithm's own blended copies of the trainable parameters
  (CRD's ``old`` and ``sampling`` models), which resuming restores;
* ``trainer_state.json``: epoch, optimizer step, the config;
* ``resume/``: optimizer, LR schedule, RNG, counters, pending samples (:mod:`trainer.resume`),
  when the loop asks for it (every checkpoint it writes).
Written into a temporary folder renamed into place by the main process (atomic); with several
processes each writes its own ``resume/*-rank<r>*`` files into it first (shared filesystem).
Under ``train.fsdp`` every process first takes part in gathering the whole tensors (the files are
the same as under DDP).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file, save_file

from shared.config import Config
from shared.models.experts import denoiser_parts, lora_dir_name


def save_checkpoint(path: Path, cfg: Config, accelerator, adapter, policy, epoch: int,
                    step: int, *, main_extra: Callable[[Path], None] | None = None,
                    rank_extra: Callable[[Path], None] | None = None) -> Path:
    """Write the checkpoint; ``rank_extra(tmp)`` runs on every process and ``main_extra(tmp)``
    on the main one, both before the rename (for :mod:`trainer.resume`'s files)."""
    tmp = path.with_name(path.name + ".tmp")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if rank_extra is not None:
        rank_extra(tmp)
    main = accelerator.is_main_process
    sharded = policy.sharded
    # under FSDP every process gathers (collectives), the main one keeps the whole tensors
    parts = {name: _whole_state(transformer, cfg, main) if sharded else None
             for name, transformer in denoiser_parts(adapter.transformer)}
    ema = None
    if policy.ema is not None:
        ema = policy.full_weights(ema=True) if sharded else policy.ema.shadow
    snapshots = {name: policy.full_weights(snapshot=name) if sharded else snap.shadow
                 for name, snap in policy.snapshots.items()}
    accelerator.wait_for_everyone()
    if main:
        if main_extra is not None:
            main_extra(tmp)
        for name, transformer in denoiser_parts(adapter.transformer):
            if cfg.model.finetune_type == "lora":
                _save_lora(transformer, tmp / lora_dir_name(name), state=parts[name])
            elif parts[name] is not None:
                _save_full(transformer, tmp / name, parts[name])
            else:
                transformer.save_pretrained(tmp / name)
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
            _save_ema_loadable(tmp, cfg, adapter, ema, parts, final=path.name == "final")
        for name, tensors in snapshots.items():  # an algorithm's own copies (CRD), for resuming
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      tmp / f"snapshot-{name}.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"epoch": epoch, "optimizer_step": step, "config": cfg.model_dump()}, indent=2))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    accelerator.wait_for_everyone()
    return path


def ema_part(ema: dict, component: str, several: bool) -> dict:
    """The EMA tensors of one denoiser component, keyed as in that component: a two-expert model's
    trainable names carry the component (``transformer_2.blocks...``), a single transformer's not."""
    if not several:
        return dict(ema)
    head = component + "."
    return {k.removeprefix(head): v for k, v in ema.items() if k.startswith(head)}


def _save_ema_loadable(tmp: Path, cfg: Config, adapter, ema: dict, parts: dict, final: bool) -> None:
    """The EMA weights (what evaluation scores) in the formats the live ones have: a LoRA run's
    ``lora_ema/`` (diffusers-loadable, every checkpoint: it is small); a full run's
    ``transformer_ema/`` (``from_pretrained``-loadable, final checkpoint only: a second model)."""
    components = denoiser_parts(adapter.transformer)
    for name, transformer in components:
        shadow = ema_part(ema, name, len(components) > 1)
        if cfg.model.finetune_type == "lora":
            state = {k.replace(".default.", "."): v.detach().cpu() for k, v in shadow.items()}
            _save_lora(transformer, tmp / (lora_dir_name(name) + "_ema"), state=state)
        elif final:
            whole = parts[name] if parts[name] is not None else transformer.state_dict()
            _save_full(transformer, tmp / f"{name}_ema", {**whole, **shadow})


def _whole_state(transformer, cfg: Config, main: bool) -> dict | None:
    """The weights a checkpoint stores (the LoRA's, or all of them), gathered one tensor at a time
    from a sharded transformer (every process calls it); the main process gets them on the CPU."""
    from trainer.sharding import gather

    if cfg.model.finetune_type == "lora":
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(transformer, adapter_name="default")
    else:
        state = transformer.state_dict()
    out = {}
    for k, v in state.items():
        whole = gather(v.detach())
        if main:
            out[k] = whole.cpu()
    return out if main else None


def _save_full(transformer, directory: Path, state: dict) -> None:
    """What ``save_pretrained`` writes (config, safetensors shards of at most 10 GB, their index),
    from whole tensors gathered from a sharded transformer."""
    from huggingface_hub import save_torch_state_dict

    from trainer.sharding import model_class

    directory.mkdir(parents=True, exist_ok=True)
    transformer.save_config(directory)
    config = directory / "config.json"  # the model's class, not FSDP's subclass of it
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": model_class(transformer).__name__},
                                 indent=2, sort_keys=True) + "\n")
    save_torch_state_dict(state, directory, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size="10GB")


def _save_lora(transformer, directory: Path, prefix: str = "transformer", state: dict | None = None) -> None:
    """Like ``transformer.save_lora_adapter`` but with keys and metadata under ``prefix.``: the
    unprefixed file it writes is skipped, with only a warning, by pipelines' ``load_lora_weights``
    and by ``load_lora_adapter``'s default ``prefix="transformer"``. ``state``: the LoRA's whole
    tensors when the transformer is sharded."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from peft.utils import get_peft_model_state_dict

    if state is None:
        state = get_peft_model_state_dict(transformer, adapter_name="default")
    meta = transformer.peft_config["default"].to_dict()
    LoraBaseMixin.write_lora_layers(
        state_dict={f"{prefix}.{k}": v.contiguous() for k, v in state.items()},
        save_directory=str(directory), is_main_process=True,
        weight_name="pytorch_lora_weights.safetensors", save_function=None,
        safe_serialization=True, lora_adapter_metadata={f"{prefix}.{k}": v for k, v in meta.items()})


def load_checkpoint_weights(path: Path, cfg: Config, adapter, policy, *, use_ema: bool = True) -> None:
    """Load a checkpoint's weights into a freshly built adapter/policy (for ``flowrl eval``).
    ``policy`` None: the model's weights only (before sharding; :func:`load_checkpoint_ema` then)."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--checkpoint {str(path)!r} is not a flowrl checkpoint (no "
                                f"trainer_state.json). Fix: pass runs/<run>/checkpoints/<name>.")
    for name, transformer in denoiser_parts(adapter.transformer):
        if cfg.model.finetune_type == "lora":
            state = load_file(path / lora_dir_name(name) / "pytorch_lora_weights.safetensors")
            from peft import set_peft_model_state_dict

            state = {k.removeprefix("transformer."): v for k, v in state.items()}
            set_peft_model_state_dict(transformer, state, adapter_name="default")
        else:
            for shard in sorted((path / name).glob("*.safetensors")):
                _load_whole(transformer, load_file(shard))
    if use_ema and policy is not None:
        load_checkpoint_ema(path, policy)


def _load_whole(transformer, state: dict) -> None:
    """``load_state_dict(state, strict=False)``; into a sharded transformer (``train.fsdp``) each
    process copies its pieces of the whole tensors."""
    import torch

    from trainer.sharding import is_sharded, local, piece_like

    params = dict(transformer.named_parameters())
    if not any(is_sharded(p) for p in params.values()):
        transformer.load_state_dict(state, strict=False)
        return
    buffers = dict(transformer.named_buffers())
    with torch.no_grad():
        for key, value in state.items():
            if key in params:
                local(params[key]).copy_(piece_like(value, params[key]))
            elif key in buffers:
                buffers[key].copy_(value)


def checkpoint_epoch(path: Path) -> int:
    """The epochs trained when the checkpoint was written (its ``trainer_state.json``)."""
    return int(json.loads((Path(path) / "trainer_state.json").read_text())["epoch"])


def load_checkpoint_ema(path: Path, policy) -> None:
    """The checkpoint's EMA shadow and the algorithm's snapshots into ``policy`` (this process's
    pieces under FSDP), where both have them; FileNotFoundError for a snapshot the checkpoint lacks."""
    ema_file = Path(path) / "ema.safetensors"
    if ema_file.is_file() and policy.ema is not None:
        policy.load_ema(load_file(ema_file))
    for name in policy.snapshots:
        snap_file = Path(path) / f"snapshot-{name}.safetensors"
        if not snap_file.is_file():
            raise FileNotFoundError(
                f"{path} has no {snap_file.name}: the {name!r} model this trainer keeps was not saved with it, "
                f"so the run cannot continue exactly. Fix: resume from a checkpoint this trainer type wrote, or "
                f"start the run afresh (model.init_from: {path} starts from its weights).")
        policy.load_snapshot(name, load_file(snap_file))
