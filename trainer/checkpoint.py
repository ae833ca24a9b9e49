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
* ``trainer_state.json``: epoch, optimizer step, the config;
* ``resume/``: optimizer, LR schedule, RNG, counters, pending samples (:mod:`trainer.resume`),
  when the loop asks for it (every checkpoint it writes).
Written into a temporary folder renamed into place by the main process (atomic); with several
processes each writes its own ``resume/*-rank<r>*`` files into it first (shared filesystem).
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
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if main_extra is not None:
            main_extra(tmp)
        for name, transformer in denoiser_parts(adapter.transformer):
            if cfg.model.finetune_type == "lora":
                _save_lora(transformer, tmp / lora_dir_name(name))
            else:
                transformer.save_pretrained(tmp / name)
        if policy.ema is not None:
            save_file({k: v.contiguous() for k, v in policy.ema.shadow.items()}, tmp / "ema.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"epoch": epoch, "optimizer_step": step, "config": cfg.model_dump()}, indent=2))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    accelerator.wait_for_everyone()
    return path


def _save_lora(transformer, directory: Path, prefix: str = "transformer") -> None:
    """Like ``transformer.save_lora_adapter`` but with keys and metadata under ``prefix.``: the
    unprefixed file it writes is skipped, with only a warning, by pipelines' ``load_lora_weights``
    and by ``load_lora_adapter``'s default ``prefix="transformer"``."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name="default")
    meta = transformer.peft_config["default"].to_dict()
    LoraBaseMixin.write_lora_layers(
        state_dict={f"{prefix}.{k}": v.contiguous() for k, v in state.items()},
        save_directory=str(directory), is_main_process=True,
        weight_name="pytorch_lora_weights.safetensors", save_function=None,
        safe_serialization=True, lora_adapter_metadata={f"{prefix}.{k}": v for k, v in meta.items()})


def load_checkpoint_weights(path: Path, cfg: Config, adapter, policy, *, use_ema: bool = True) -> None:
    """Load a checkpoint's weights into a freshly built adapter/policy (for ``flowrl eval``)."""
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
                transformer.load_state_dict(load_file(shard), strict=False)
    ema_file = path / "ema.safetensors"
    if use_ema and ema_file.is_file() and policy.ema is not None:
        policy.ema.load_state_dict(load_file(ema_file))
