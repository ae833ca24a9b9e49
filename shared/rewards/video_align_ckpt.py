"""Reading a VideoAlign (VideoReward) checkpoint folder: its settings, its prompt template and its
weights, renamed into ``transformers``' current ``Qwen2VLForConditionalGeneration`` with the LoRA
merged. Used by :mod:`shared.rewards.video_align`.

The released checkpoint (hub repository ``KwaiVGI/VideoReward``) is a folder with
``model_config.json`` (the training run's data, model, LoRA and inference settings) and
``checkpoint-<step>/`` subfolders, each holding either

* ``adapter_model.safetensors`` (peft LoRA on the language model's linear and embedding layers)
  and ``non_lora_state_dict.pth`` (the other trained tensors: the reward head ``rm_head`` and the
  token embeddings that carry the three reward tokens), or
* ``model.pth``, the whole model's state dict.

Names are those of transformers 4.45 under peft (``base_model.model.model.layers.0...``,
``base_model.model.visual...``); :func:`current_name` maps them to today's
(``model.language_model.layers.0...``, ``model.visual...``). The ``.pth`` files are read with
``weights_only`` (tensors only; nothing is unpickled beyond that).
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("VQ", "MQ", "TA")
#: ``data_config.prompt_template_type`` -> the name of its constant in VideoAlign's prompt_template.py
TEMPLATE_NAMES = {"detailed_special": "DETAILED_PROMPT_WITH_SPECIAL_TOKEN"}
TEMPLATE_FIELD = "{text_prompt}"
DEFAULT_MAX_PIXELS = 240 * 320  # VideoAlign's DataConfig defaults, for keys a model_config.json leaves out
DEFAULT_FPS = 2.0
DEFAULT_TEMPLATE_TYPE = "none"


@dataclass(frozen=True)
class VideoAlignSettings:
    """What scoring takes from ``model_config.json``.

    ``fps`` / ``num_frames``: how frames are sampled (exactly one is set); ``max_pixels``: the
    per-frame pixel budget; ``template_type``: the prompt template the model was trained with;
    ``lora_scale``: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); ``norm``: per dimension
    ``(mean, std)`` to standardize with, or None."""

    base_model: str
    fps: float | None
    num_frames: float | None
    max_pixels: int
    template_type: str
    lora_scale: float
    norm: dict[str, tuple[float, float]] | None


def read_settings(folder: Path, who: str) -> VideoAlignSettings:
    """:class:`VideoAlignSettings` from ``folder/model_config.json``; :class:`ValueError` naming
    the file and the problem when it is missing or describes a model this reward cannot run."""
    path = folder / "model_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{who}: '{folder}' has no model_config.json, so it is not a VideoAlign checkpoint "
                                f"folder. Fix: point checkpoint at the folder of KwaiVGI/VideoReward (the one "
                                f"holding model_config.json and checkpoint-*/).")
    try:
        cfg = json.loads(path.read_text())
        data, model, lora = cfg["data_config"], cfg["model_config"], cfg.get("peft_lora_config") or {}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{who}: {path} is not a VideoAlign model_config.json ({type(e).__name__}: {e}); it "
                         f"needs 'data_config' and 'model_config'") from None
    if model.get("use_special_tokens") is not True:
        raise ValueError(f"{who}: {path}: model_config.use_special_tokens is {model.get('use_special_tokens')!r}; "
                         f"flowrl runs VideoAlign models that read their scores at the reward tokens "
                         f"{', '.join(REWARD_TOKENS)} (use_special_tokens: true), as the released VideoReward does")
    if data.get("sample_type", "uniform") != "uniform":
        raise ValueError(f"{who}: {path}: data_config.sample_type is {data.get('sample_type')!r}; flowrl samples "
                         f"frames 'uniform'ly, as the released VideoReward does")
    num_frames = data.get("num_frames")
    fps = None if num_frames is not None else float(data.get("fps") or DEFAULT_FPS)
    r, alpha = lora.get("lora_r", 16), lora.get("lora_alpha", 32)
    scale = alpha / math.sqrt(r) if lora.get("use_rslora") else alpha / r
    inference = cfg.get("inference_config")
    norm = None
    if inference:
        try:
            norm = {d: (float(inference[f"{d}_mean"]), float(inference[f"{d}_std"])) for d in DIMENSIONS}
        except KeyError as e:
            raise ValueError(f"{who}: {path}: inference_config lacks {e.args[0]!r}") from None
    return VideoAlignSettings(
        base_model=str(model.get("model_name_or_path") or "Qwen/Qwen2-VL-2B-Instruct"),
        fps=fps, num_frames=None if num_frames is None else float(num_frames),
        max_pixels=int(data.get("max_frame_pixels") or DEFAULT_MAX_PIXELS),
        template_type=str(data.get("prompt_template_type") or DEFAULT_TEMPLATE_TYPE),
        lora_scale=float(scale), norm=norm)


def step_folder(folder: Path, step: int, who: str) -> Path:
    """``folder/checkpoint-<step>`` (``step`` -1: the highest step there), or ``folder`` itself
    when it holds the weights directly."""
    found = {int(m[1]): p for p in folder.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))}
    if step != -1:
        if step not in found:
            raise FileNotFoundError(f"{who}: '{folder}' has no checkpoint-{step}; it has "
                                    f"{', '.join(f'checkpoint-{s}' for s in sorted(found)) or 'none'}. Fix: set step "
                                    f"to one of those, or -1 for the latest")
        return found[step]
    if found:
        return found[max(found)]
    if (folder / "model.pth").is_file() or (folder / "adapter_model.safetensors").is_file():
        return folder
    raise FileNotFoundError(f"{who}: '{folder}' has no checkpoint-*/ folder and no weights of its own "
                            f"(adapter_model.safetensors or model.pth). Fix: download the whole checkpoint folder")


def current_name(key: str) -> str | None:
    """A VideoAlign (transformers 4.45, maybe peft-wrapped) parameter name -> its name in today's
    ``Qwen2VLForConditionalGeneration`` plus ``rm_head``; None for a name to skip (peft's copy of
    an original module kept beside its ``modules_to_save`` twin). LoRA names keep their
    ``lora_A`` / ``lora_B`` / ``lora_embedding_A`` / ``lora_embedding_B`` part."""
    key = key.removeprefix("module.").removeprefix("base_model.model.")
    if ".original_module." in key:
        return None
    key = re.sub(r"\.modules_to_save(\.default)?\.", ".", key).replace(".base_layer.", ".")
    key = re.sub(r"\.(lora_(?:embedding_)?[AB])(?:\.default)?(\.weight)?$", r".\1", key)
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key.removeprefix("model.")
    if key.startswith("visual."):
        return "model." + key
    return key


def load_weights(folder: Path, who: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(weights, lora)`` of one ``checkpoint-<step>`` folder, in :func:`current_name` names:
    ``weights`` replace the base model's tensors, ``lora`` holds ``<module>.lora_A`` /
    ``.lora_B`` (``lora_embedding_A`` / ``_B`` for embeddings) pairs to merge."""
    from safetensors.torch import load_file

    from shared.rewards.clip_rewards import load_torch_state

    raw: dict[str, torch.Tensor] = {}
    if (folder / "model.pth").is_file():
        raw.update(load_torch_state(folder / "model.pth", option="checkpoint", who=who))
    else:
        adapter, rest = folder / "adapter_model.safetensors", folder / "non_lora_state_dict.pth"
        missing = [p.name for p in (adapter, rest) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{who}: '{folder}' lacks {' and '.join(missing)}. Fix: download the whole "
                                    f"checkpoint folder (model.pth, or adapter_model.safetensors with "
                                    f"non_lora_state_dict.pth)")
        raw.update(load_torch_state(rest, option="checkpoint", who=who))
        raw.update(load_file(str(adapter)))
    weights: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = current_name(key)
        if name is None:
            continue
        (lora if re.search(r"\.lora_(embedding_)?[AB]$", name) else weights)[name] = value
    return weights, lora


def merge_lora(state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scale: float, who: str) -> None:
    """Add each LoRA pair's update into the tensors of ``state`` (``{name: tensor}``, e.g. a model's
    parameters; written in place), in float32 and cast back. Linear: ``W += scale * B @ A`` (``A [r, in]``, ``B [out, r]``); embedding:
    ``E += scale * (B @ A)^T`` (``A [r, num_embeddings]``, ``B [dim, r]``), as peft merges them."""
    modules = {name.rsplit(".", 1)[0] for name in lora}
    for module in sorted(modules):
        for a_name, b_name, embedding in (("lora_A", "lora_B", False), ("lora_embedding_A", "lora_embedding_B", True)):
            a, b = lora.get(f"{module}.{a_name}"), lora.get(f"{module}.{b_name}")
            if a is None and b is None:
                continue
            if a is None or b is None:
                raise ValueError(f"{who}: the checkpoint has {module}.{a_name if a is not None else b_name} "
                                 f"without its pair; the LoRA weights are incomplete")
            target = f"{module}.weight"
            if target not in state:
                raise ValueError(f"{who}: the checkpoint has LoRA weights for {module}, which the base model does "
                                 f"not have. Fix: use the base model the checkpoint was trained on "
                                 f"(model_config.json's model_name_or_path)")
            delta = b.float() @ a.float()
            delta = delta.T if embedding else delta
            weight = state[target]
            if tuple(delta.shape) != tuple(weight.shape):
                raise ValueError(f"{who}: LoRA update of {module} is {tuple(delta.shape)} but the weight is "
                                 f"{tuple(weight.shape)}. Fix: use the base model the checkpoint was trained on")
            with torch.no_grad():
                weight.copy_((weight.float() + scale * delta.to(weight.device)).to(weight.dtype))


def read_template(spec: str | None, name: str, who: str) -> str:
    """The prompt template: ``spec`` a text file holding it, or VideoAlign's ``prompt_template.py``
    (the string constant ``name`` is read with :mod:`ast`; the file is not run). It must contain
    ``{text_prompt}`` once and each reward token once."""
    how = (f"set template to VideoAlign's prompt_template.py (github.com/KwaiVGI/VideoAlign; flowrl reads its "
           f"{name} without running the file) or to a text file holding that prompt, with {TEMPLATE_FIELD} where "
           f"the video's prompt goes")
    if spec is None:
        raise ValueError(f"{who}: needs the prompt the checkpoint was trained with, which flowrl does not ship. "
                         f"Fix: {how}")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{who}: template '{spec}' is not a file. Fix: {how}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        found = None
        for node in ast.parse(text).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                found = node.value
        if not (isinstance(found, ast.Constant) and isinstance(found.value, str)):
            raise ValueError(f"{who}: template '{spec}' assigns no string constant {name}. Fix: {how}")
        text = found.value
    problems = [f"'{t}' {text.count(t)} times" for t in (TEMPLATE_FIELD, *REWARD_TOKENS) if text.count(t) != 1]
    if not problems and sorted(REWARD_TOKENS, key=text.index) != list(REWARD_TOKENS):
        problems.append(f"the reward tokens in another order than {', '.join(REWARD_TOKENS)} (VideoAlign reads its "
                        f"scores in the order the tokens appear)")
    if problems:
        raise ValueError(f"{who}: template '{spec}' must hold {TEMPLATE_FIELD} and each reward token once; it has "
                         f"{'; '.join(problems)}. Fix: {how}")
    return text


def fill_template(template: str, prompt: str) -> str:
    """The template with the video's prompt in place of ``{text_prompt}`` (only that field: braces
    elsewhere in the template or the prompt stay as they are)."""
    return template.replace(TEMPLATE_FIELD, prompt)


def describe(mapping: dict[str, Any], limit: int = 4) -> str:
    names = sorted(mapping)
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
