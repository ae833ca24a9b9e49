"""A tiny VideoAlign checkpoint for tests of :mod:`shared.rewards.video_align`.

* :func:`build_base`: a random-weight Qwen2-VL (2 text layers, 1 vision block, 16 wide) saved with
  ``save_pretrained``, with a byte-level BPE Qwen tokenizer built here, a Qwen2-VL-style chat
  template written here (a default system turn, ``<|vision_start|><|video_pad|><|vision_end|>`` for
  a video block) and an image processor config with its own mean and std.
* :func:`write_checkpoint`: a folder laid out as VideoAlign's training writes it:
  ``model_config.json`` and ``checkpoint-<step>/`` with ``adapter_model.safetensors`` (peft's own
  LoRA state dict of linear and embedding layers, names moved to transformers 4.45's layout:
  ``model.layers...`` for the text model, ``visual...`` for the tower) and
  ``non_lora_state_dict.pth`` (the reward head and the resized token embeddings).
  It returns the unmerged peft model (current names) that the files were written from, so a test
  can compute the reference scores without any of the reward's loading code.
* :data:`TEMPLATE`: a prompt template with the three reward tokens, written for the tests.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from shared.rewards.video_align_ckpt import REWARD_TOKENS

TEMPLATE = ("Rate this generated video.\nThe prompt was \"{text_prompt}\".\nVisual quality: <|VQ_reward|>\n"
            "Motion quality: <|MQ_reward|>\nText alignment: <|TA_reward|>\n")
#: Qwen2-VL's chat structure, written here: a default system turn, then each block of a user turn
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for block in message['content'] %}"
    "{% if block['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif block['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
IMAGE_MEAN, IMAGE_STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
NORM = {"VQ": (0.5, 2.0), "MQ": (-0.25, 0.5), "TA": (1.0, 4.0)}


def build_base(directory: Path, seed: int = 0) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tests.helpers.tiny_pipelines import build_qwen_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tok = build_qwen_tokenizer(directory, templates=(TEMPLATE.replace("{text_prompt}", "{}"),))
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "vocab_size": len(tok),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "mrope"},
                     "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
                     "pad_token_id": tok.pad_token_id},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        vocab_size=len(tok), image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)
    Qwen2VLForConditionalGeneration(config).eval().save_pretrained(directory)
    Qwen2VLImageProcessorPil(image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD)).save_pretrained(directory)
    return directory


def old_name(key: str) -> str:
    """A current parameter name (under peft's ``base_model.model.``) in transformers 4.45's layout."""
    return (key.replace("base_model.model.model.language_model.", "base_model.model.model.")
            .replace("base_model.model.model.visual.", "base_model.model.visual."))


def write_checkpoint(directory: Path, base: Path, *, seed: int = 1, step: int = 100, r: int = 4, alpha: int = 8,
                     output_dim: int = 1, fps: float = 2.0, num_frames: int | None = None,
                     max_pixels: int = 336 * 336, norm: bool = True):
    """Write the checkpoint folder; return ``(peft_model, head [output_dim, 16], token_ids)``."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(list(REWARD_TOKENS), special_tokens=True)  # appended: ids len(tokenizer)...
    token_ids = tuple(tok.convert_tokens_to_ids(list(REWARD_TOKENS)))
    model = Qwen2VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained embeddings: the new rows (and a nudge to the others)
        embed = model.get_input_embeddings().weight
        embed.add_(0.05 * torch.randn(embed.shape, generator=g))
        embed[list(token_ids)] = torch.randn(len(token_ids), embed.shape[1], generator=g)
    targets = [n for n, m in model.named_modules()
               if "language_model" in n and isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    with warnings.catch_warnings():  # the embedding is tied to the (unused) output head, as in Qwen2-VL-2B
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                      lora_dropout=0.0))
    with torch.no_grad():  # LoRA as trained: both factors nonzero
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    head = torch.randn(output_dim, 16, generator=g)
    folder = directory / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    lora = {old_name(k): v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(lora, str(folder / "adapter_model.safetensors"))
    embed_key = next(k for k, _ in peft_model.named_parameters() if k.endswith("embed_tokens.base_layer.weight"))
    torch.save({"base_model.model.rm_head.weight": head,
                old_name(embed_key): peft_model.get_parameter(embed_key).detach().clone()},
               folder / "non_lora_state_dict.pth")
    config = {
        "data_config": {"meta_data": "x.csv", "data_dir": "videos", "fps": fps, "num_frames": num_frames,
                        "max_frame_pixels": max_pixels, "sample_type": "uniform", "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special"},
        "training_args": {"output_dir": str(directory)},
        "model_config": {"model_name_or_path": str(base), "output_dim": output_dim, "use_special_tokens": True,
                         "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "lora_r": r, "lora_alpha": alpha, "use_rslora": False},
    }
    if norm:
        config["inference_config"] = {f"{d}_{s}": v for d, (m, sd) in NORM.items()
                                      for s, v in (("mean", m), ("std", sd))}
    (directory / "model_config.json").write_text(json.dumps(config, indent=2))
    return peft_model.eval(), head, token_ids


def write_template_py(path: Path, name: str = "DETAILED_PROMPT_WITH_SPECIAL_TOKEN") -> Path:
    """A ``prompt_template.py`` laid out like VideoAlign's (constants and a function), holding
    :data:`TEMPLATE` under ``name``; reading it must not run it (it raises when run)."""
    path.write_text(f'raise RuntimeError("this file must not be executed")\n\nOTHER = "x"\n\n'
                    f'{name} = """{TEMPLATE}"""\n\n\ndef build_prompt(prompt):\n    return {name}.format(text_prompt=prompt)\n')
    return path
