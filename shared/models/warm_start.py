"""``model.init_from``: start a run from weights trained elsewhere (an SFT LoRA, another flowrl run,
a fine-tuned transformer) instead of the bare base model. Not a resume: optimizer, EMA history,
schedules and counters start fresh (``--resume`` continues a run exactly).

What ``init_from`` may name (:func:`find_source`):

* a flowrl checkpoint folder (``runs/<run>/checkpoints/<name>``): its LoRA or full weights;
* a LoRA: a ``pytorch_lora_weights.safetensors`` file (diffusers' format, what flowrl saves and
  ``pipeline.save_lora_weights`` writes), or a folder holding one;
* full weights: a transformer folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``)
  or a pipeline folder with one in ``transformer/``.

In the distributed mode samplers read the same path (a shared volume, as for
``model.model_name_or_path``).

How they enter the run (:func:`warm_start`), by the run's ``model.finetune_type``:

=============  ======================================  =================================================
source         lora run                                full run
=============  ======================================  =================================================
LoRA           into the trained adapter (same rank     fused into the weights (diffusers ``fuse_lora``),
               and alpha), trained further             then trained
full weights   into the frozen base; a new LoRA        into the weights, then trained
               trains on top
=============  ======================================  =================================================

The KL reference is the base as the run sees it before training: for a full run and for full
weights under LoRA that is the warm start; for a LoRA loaded into the trained adapter it is the
base without the adapter, as in every LoRA run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from shared.config import ConfigError
from shared.models.experts import denoiser_parts, lora_dir_name

LORA_FILE = "pytorch_lora_weights.safetensors"


class WarmStartError(ConfigError):
    """``model.init_from`` cannot be used as given (the message names the path and the fix)."""


@dataclass(frozen=True)
class Source:
    kind: str  # "lora" | "full"
    files: dict[str, list[Path]]  # per denoiser component ("transformer", "transformer_2"): its files
    lora_shape: tuple[int, float] | None = None  # (rank, alpha) when known (a flowrl checkpoint)
    inferred: bool = False  # lora_shape read off the tensors (a file without metadata: alpha = rank)


def find_source(path: str | Path, components: list[str], ema: bool = False) -> Source:
    """What ``path`` holds, for a model whose denoiser has ``components``; ``ema``: of a flowrl
    checkpoint, its EMA weights (``lora_ema/``, ``transformer_ema/``) where it saved them.
    Raises :class:`WarmStartError` naming what was expected."""
    p = Path(path).expanduser()
    if not p.exists():
        raise WarmStartError(f"model.init_from: {str(p)!r} does not exist. Fix: point it at a flowrl checkpoint "
                             f"folder, a {LORA_FILE} (or its folder), or a transformer folder.")
    if (p / "trainer_state.json").is_file():  # a flowrl checkpoint
        saved = json.loads((p / "trainer_state.json").read_text()).get("config", {}).get("model", {})
        if saved.get("finetune_type") == "lora":
            folder = lambda c: lora_dir_name(c) + ("_ema" if ema and (p / f"{lora_dir_name(c)}_ema").is_dir() else "")  # noqa: E731
            files = {c: [p / folder(c) / LORA_FILE] for c in components}
            rank = saved.get("lora_rank")
            return Source("lora", _existing(files, p), (rank, saved.get("lora_alpha") or 2 * rank))
        folder = lambda c: c + ("_ema" if ema and (p / f"{c}_ema").is_dir() else "")  # noqa: E731
        files = {c: sorted((p / folder(c)).glob("*.safetensors")) for c in components}
        return Source("full", _existing(files, p))
    single = components == ["transformer"]
    if p.is_file() and p.suffix == ".safetensors" or (p / LORA_FILE).is_file():
        if not single:
            raise WarmStartError(f"model.init_from: {str(p)!r} is one LoRA file, but this model has two experts "
                                 f"({', '.join(components)}). Fix: pass a flowrl checkpoint folder (lora/, lora_2/).")
        file = p if p.is_file() else p / LORA_FILE
        shape = _lora_metadata(file)
        if shape is None:  # diffusers applies such a file at alpha = rank (scale 1)
            shape = _lora_rank(file)
            return Source("lora", {"transformer": [file]}, shape and (shape, float(shape)), inferred=True)
        return Source("lora", {"transformer": [file]}, shape)
    folder = p / "transformer" if (p / "transformer" / "config.json").is_file() else p
    shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if (folder / "config.json").is_file() and shards and single:
        return Source("full", {"transformer": shards})
    raise WarmStartError(
        f"model.init_from: {str(p)!r} is none of: a flowrl checkpoint (trainer_state.json), a LoRA "
        f"({LORA_FILE}), a transformer folder (config.json + diffusion_pytorch_model*.safetensors) or a "
        f"pipeline folder with one in transformer/. Fix: point it at one of those.")


def _lora_metadata(file: Path) -> tuple[int, float] | None:
    """(rank, alpha) from a diffusers LoRA file's ``lora_adapter_metadata``, when it has one."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = (f.metadata() or {}).get("lora_adapter_metadata")
    if not meta:
        return None
    config = json.loads(meta)
    for prefix in ("transformer.", ""):
        if f"{prefix}r" in config:
            rank = int(config[f"{prefix}r"])
            return rank, float(config.get(f"{prefix}lora_alpha") or rank)
    return None


def _lora_rank(file: Path) -> int | None:
    """The rank of a LoRA file's ``lora_A`` matrices when they all share one (None otherwise)."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_A" in k or "lora_down" in k}
    return ranks.pop() if len(ranks) == 1 else None


def _existing(files: dict[str, list[Path]], root: Path) -> dict[str, list[Path]]:
    for component, paths in files.items():
        if not paths or not all(f.is_file() for f in paths):
            raise WarmStartError(f"model.init_from: the checkpoint {str(root)!r} has no weights for {component}. "
                                 f"Fix: pass a complete checkpoint of the same model family.")
    return files


def _lora_state(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update({k.removeprefix("transformer."): v for k, v in load_file(f).items()})
    return state


def load_checkpoint_into(model_cfg, adapter, path: str | Path, ema: bool = True) -> str:
    """Load a flowrl checkpoint (or any source :func:`find_source` takes) into a model built as
    its run built it (LoRA added for a LoRA run); ``ema``: its EMA weights where saved (what
    evaluation scores). For servers and tools outside the trainer. Returns which weights."""
    parts = denoiser_parts(adapter.transformer)
    source = find_source(path, [name for name, _ in parts], ema=ema)
    lora_run = model_cfg.finetune_type == "lora"
    if source.kind == "full" and lora_run:
        raise WarmStartError(f"{str(path)!r} holds full weights, but model.finetune_type is lora. Fix: use the "
                             f"config of the run that wrote it (finetune_type: full), or model.init_from.")
    if source.kind == "lora" and not lora_run:
        raise WarmStartError(f"{str(path)!r} holds a LoRA, but model.finetune_type is full. Fix: use the config of "
                             f"the run that wrote it (finetune_type: lora).")
    for name, module in parts:
        if lora_run:
            _load_into_adapter(module, source, _lora_state(source.files[name]), model_cfg, path)
        else:
            _load_full(module, source.files[name], path)
    used_ema = any("_ema" in f.parent.name for fs in source.files.values() for f in fs)
    return "ema" if used_ema else "live"


def warm_start(model_cfg, adapter, stage: str) -> str | None:
    """Load ``model_cfg.init_from`` (``model:``) into ``adapter`` at ``stage``: ``"before"`` LoRA is
    added (:func:`shared.models.lora.prepare_transformer`; full weights, and a LoRA fused into a full
    run) or ``"after"`` (a LoRA into the run's own adapter). Returns what was loaded (for the log),
    or None when nothing at this stage. Samplers call the ``"before"`` stage of a LoRA run (the
    published LoRA needs the same base); everything else reaches them as published weights."""
    path = model_cfg.init_from
    if path is None:
        return None
    parts = denoiser_parts(adapter.transformer)
    source = find_source(path, [name for name, _ in parts])
    lora_run = model_cfg.finetune_type == "lora"
    into_adapter = source.kind == "lora" and lora_run
    if (stage == "after") != into_adapter:
        return None
    for name, module in parts:
        if source.kind == "full":
            _load_full(module, source.files[name], path)
        elif into_adapter:
            _load_into_adapter(module, source, _lora_state(source.files[name]), model_cfg, path)
        else:
            _fuse(module, source.files[name][0], path)
    how = {("lora", True): "LoRA loaded into the trained adapter", ("lora", False): "LoRA fused into the weights",
           ("full", True): "full weights loaded into the frozen base", ("full", False): "full weights loaded"}
    return f"model.init_from {path}: {how[(source.kind, lora_run)]}"


def _load_full(module: torch.nn.Module, shards: list[Path], path) -> None:
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(shard))
    own = module.state_dict()
    unknown = [k for k in state if k not in own]
    if len(unknown) == len(state):
        raise WarmStartError(f"model.init_from: no tensor of {str(path)!r} belongs to {type(module).__name__} "
                             f"(e.g. {unknown[0]!r}). Fix: pass weights of this model family.")
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if wrong:
        raise WarmStartError(f"model.init_from: {str(path)!r} has {len(wrong)} tensors of another shape than the "
                             f"model's (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs "
                             f"{tuple(own[wrong[0]].shape)}). Fix: pass weights of the same architecture.")
    missing = [k for k in own if k not in state]
    if missing:
        raise WarmStartError(f"model.init_from: {str(path)!r} lacks {len(missing)} of the model's tensors (e.g. "
                             f"{missing[0]!r}). Fix: pass a complete transformer.")
    module.load_state_dict({k: v for k, v in state.items() if k in own})


def _load_into_adapter(module, source: Source, state: dict, model_cfg, path) -> None:
    from peft import set_peft_model_state_dict

    rank, alpha = model_cfg.lora_rank, model_cfg.lora_alpha or 2 * model_cfg.lora_rank
    if source.lora_shape is not None and tuple(source.lora_shape) != (rank, alpha):
        why = (" (its file has no lora_adapter_metadata: diffusers' load_lora_weights applies it at alpha = "
               "rank, and so does this run once its alpha matches; at another alpha it would start from another "
               "model than the one the LoRA was trained as)") if source.inferred else ""
        raise WarmStartError(
            f"model.init_from: {str(path)!r} is a LoRA of rank {source.lora_shape[0]} and alpha "
            f"{source.lora_shape[1]:g}{why}; this run's is rank {rank}, alpha {alpha:g}. Fix: set model.lora_rank: "
            f"{source.lora_shape[0]} and model.lora_alpha: {source.lora_shape[1]:g}.")
    try:
        result = set_peft_model_state_dict(module, state, adapter_name="default")
    except RuntimeError as e:  # size mismatches: another rank
        raise WarmStartError(f"model.init_from: {str(path)!r} does not fit this run's LoRA ({e}). Fix: set "
                             f"model.lora_rank to the file's rank.") from None
    loaded = len(state) - len(result.unexpected_keys)
    if loaded == 0 or result.unexpected_keys:
        raise WarmStartError(
            f"model.init_from: {len(result.unexpected_keys)} of the {len(state)} LoRA tensors of {str(path)!r} "
            f"target layers this run's LoRA does not (e.g. {sorted(result.unexpected_keys)[0]!r}). Fix: set "
            f"model.target_modules to the layers the LoRA was trained on.")


def _fuse(module, file: Path, path) -> None:
    """A LoRA file fused into ``module``'s own weights (a full fine-tune starting from base + LoRA);
    diffusers reads its rank and alpha from the file's metadata."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        prefixed = all(k.startswith("transformer.") for k in f.keys())
    try:
        module.load_lora_adapter(str(file.parent), weight_name=file.name, adapter_name="init_from",
                                 prefix="transformer" if prefixed else None, local_files_only=True)
    except (ValueError, RuntimeError) as e:
        raise WarmStartError(f"model.init_from: {str(path)!r} does not load as a LoRA of "
                             f"{type(module).__name__} ({e}).") from None
    module.fuse_lora(adapter_names=["init_from"])
    module.unload_lora()
